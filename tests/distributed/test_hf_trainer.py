"""AttentTrainer (HF Trainer + AtteNT teacher) as real processes: torchrun, DeepSpeed ZeRO-3, LoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import procs
import pytest
from servers import free_port

from attent_scale import launcher
from attent_scale.config import load_config
from attent_scale.integrations.sampler import AttentBatchSampler, deal, epoch_order
from attent_scale.teacher import Selection, Teacher, read_records

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "helpers" / "hf_worker.py"
N = 64  # hf_worker.N_SAMPLES
# strategy signal: the default teacher (wider learned / unlearnable quantiles, so that the toy run drops
# some) on 20 held-out rows (2 ranks x eval batch 8: accelerate pads the last batch with repeats),
# evaluated at steps 0, 12, 24 and at the end; subset epochs start at steps 8, 16, 24
SIGNAL = dict(teacher="default", val=20, eval_steps=12, eval_on_start=True, epochs=4,
              teacher_set={"signal_learned_quantile": 0.3, "signal_unlearnable_quantile": 0.7})

pytestmark = pytest.mark.slow


def _run(tmp: Path, name: str, nproc: int, **spec: Any) -> Path:
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    spec_path = tmp / f"{name}.json"
    spec_path.write_text(json.dumps({"out": str(out), **spec}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = launcher.command((str(WORKER), str(spec_path)), nproc,
                           rendezvous=(f"--master_port={free_port(1)}",), torchrun=True)
    proc = procs.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def _losses(out: Path) -> list[float]:
    """The logged training loss of every step (logging_steps=1), in step order."""
    hist = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in hist] == list(range(1, len(hist) + 1))
    return [h["loss"] for h in hist]


def _shas(out: Path) -> list[str]:
    return [r["sha256"] for r in read_records(out / "selection.jsonl")]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _replay(out: Path, world: int) -> list[str]:
    """Feed the per-sample losses the run's ranks recorded into one fresh single-process Teacher (the one
    `attent-scale train` uses) and select at the run's (epoch, step) points: a selection at step s sees the
    training losses of steps < s and the scoring pass of step s."""
    import torch
    from hf_worker import hard_teacher_config

    events = []
    for r in range(world):
        events += [json.loads(line) for line in (out / f"losses.rank{r}.jsonl").read_text().splitlines()]
    events.sort(key=lambda e: (e["step"], e["kind"] != "score"))
    teacher = Teacher(hard_teacher_config(), num_samples=N, seed=0)
    shas, i = [], 0
    for rec in read_records(out / "selection.jsonl"):
        while i < len(events) and (events[i]["step"], events[i]["kind"] != "score") <= (rec["step"], False):
            e = events[i]
            ids, losses = np.asarray(e["ids"], dtype=np.int64), np.asarray(e["losses"], dtype=np.float32)
            if e["kind"] == "train":
                teacher.observe(ids, losses, e["step"])
            else:
                teacher.score_pass([{"ids": torch.from_numpy(ids)}],
                                   lambda _b, x=losses: torch.from_numpy(x), e["step"])
            i += 1
        shas.append(teacher.select(rec["epoch"], rec["step"]).sha256)
    return shas


# ---------------------------------------------------------------- in-process unit checks


def test_default_teacher_config_is_the_demo_config() -> None:
    from attent_scale.integrations.hf import default_teacher_config

    assert default_teacher_config() == load_config(REPO / "configs" / "demo.yaml", []).teacher


@pytest.mark.parametrize("n,world,batch", [(13, 2, 4), (64, 3, 5), (10, 1, 4), (7, 4, 2)])
def test_deal_equal_counts_cover_once(n: int, world: int, batch: int) -> None:
    order = epoch_order(np.arange(100, 100 + n), seed=3, epoch=1)
    per_rank = [deal(order, batch, r, world)[0] for r in range(world)]
    counts = [[len(b) for b in bs] for bs in per_rank]
    assert all(c == counts[0] for c in counts), counts  # same batch count and sizes on every rank
    seen = np.concatenate([np.concatenate(bs) if bs else np.zeros(0, np.int64) for bs in per_rank])
    assert len(set(seen.tolist())) == len(seen) == (n // world) * world  # no repeats; drop < world
    # global batch c (chunks dealt round-robin) is the same whatever the world size splitting it
    if world > 1 and n // world >= batch:
        assert per_rank[1][0].tolist() == order[batch:2 * batch].tolist()


def test_sampler_follows_selection() -> None:
    s = AttentBatchSampler(20, 3, rank=0, world_size=1, seed=0)
    s.set_epoch(2)
    sel = Selection.from_ids(np.array([1, 5, 7, 11, 19]), 20)
    s.set_selection(sel)
    got = [i for b in s for i in b]
    assert sorted(got) == [1, 5, 7, 11, 19] and len(s) == 2
    assert got == epoch_order(sel.ids(), 0, 2).tolist()


def test_a_checkpoint_from_before_the_teacher_session_resumes_where_it_stood() -> None:
    """AttentTrainer's per-rank state written before the session (selection and counts in one "progress"
    entry) is re-cut: the session resumes inside the same epoch at the same step."""
    from hf_worker import hard_teacher_config

    from attent_scale.integrations.hf import _upgrade
    from attent_scale.teacher import Batching, Budget, TeacherSession
    from attent_scale.train_state import Progress

    bits = Selection.from_ids(np.arange(0, 64, 2), 64).bits
    old = {"teacher": {}, "world_size": 1, "progress": {
        "epoch": 1, "epoch_start_step": 8, "epoch_batches": 7, "selection_bits": bits, "weight_bits": None,
        "weight": 1.0, "samples_trained": 90, "dropped_samples": 1, "record_lines": 2}}
    state = _upgrade(old, 64, accum=2)
    session = TeacherSession.build(hard_teacher_config(), num_samples=64, seed=0, batching=Batching(1, 4, 2),
                                   budget=Budget(epochs=3))
    session.state = session.state.from_state(state["selection"])
    assert session.resume_point(10) == (1, 2) and session.resume_point(12) == (2, 0)  # 4 steps of 2 batches
    assert session.state.ratio == 0.5 and session.state.bits is bits and state["record_lines"] == 2
    assert Progress.from_state(state["progress"]).samples_trained == 90 and _upgrade(state, 64, 2) is state


# ---------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference run: 2 processes, batch 4 each, 3 epochs, a checkpoint at step 9 (inside epoch 1), the
    ledger exchanging pending observations every 2 steps."""
    return _run(tmp_path_factory.mktemp("hf"), "w2", 2, batch=4, ga=1, save_steps=9, exchange_every=2)


@pytest.fixture(scope="module")
def signal_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The strategy signal run: 2 processes, batch 4 each, 4 epochs, a checkpoint at step 13 (after the
    evaluation at step 12, before the selection at step 16 that uses it)."""
    return _run(tmp_path_factory.mktemp("hfsig"), "s2", 2, batch=4, ga=1, save_steps=13, exchange_every=2,
                **SIGNAL)


def test_selection_world_size_independent_and_equals_teacher(tmp_path: Path, two_ranks: Path) -> None:
    """1 process (batch 4 x accumulation 2) and 2 processes (batch 4 each): same global batches, the
    same selections, and each equals a fresh Teacher fed the losses the ranks recorded."""
    one = _run(tmp_path, "w1", 1, batch=4, ga=2, metrics_port=free_port(1))
    shas = _shas(one)
    assert len(shas) == 2 and shas == _shas(two_ranks)
    assert _replay(one, 1) == shas
    assert _replay(two_ranks, 2) == shas
    # identical until the first short last step (1 sample dropped by rank equalisation on 2 ranks)
    l1, l2 = _losses(one), _losses(two_ranks)
    assert l1[:9] == pytest.approx(l2[:9], rel=1e-6, abs=1e-7)
    hist = json.loads((one / "log_history.json").read_text())
    ratios = [h["attent/selected_ratio"] for h in hist if "attent/selected_ratio" in h]
    assert ratios[0] == 1.0 and 0.15 < ratios[1] < 0.25  # selection metrics went through Trainer.log
    prom = (one / "metrics.prom").read_text()  # and through our Prometheus exporter
    scored = [line for line in prom.splitlines() if line.startswith("attent_samples_scored_total{")]
    assert scored and float(scored[0].split()[-1]) == 64 + (64 - 13)  # rescore=stale skips the 13 trained
    assert 'attent_selection_seconds_count{' in prom


def test_loss_parity_with_plain_trainer(tmp_path: Path, two_ranks: Path) -> None:
    """Plain Trainer over the teacher's warm-up order (sequential sampler on epoch 0's permutation, the
    same number of steps so the LR schedules match): the same loss at every step of the full epoch."""
    order = epoch_order(np.arange(N), seed=0, epoch=0).tolist()
    steps = len(_losses(two_ranks))
    plain = _run(tmp_path, "plain", 2, batch=4, ga=1, max_steps=steps, plain=True, sampling="sequential",
                 subset_order=order)
    lp, la = _losses(plain), _losses(two_ranks)
    assert len(lp) == steps
    assert la[:N // 8] == pytest.approx(lp[:N // 8], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("strategy", ["hard", "signal"])
def test_resume_matches_uninterrupted(tmp_path: Path, request: pytest.FixtureRequest, strategy: str) -> None:
    """2 ranks: stop one step after the checkpoint (inside the first subset epoch), resume from it: the
    selection records and every step's loss equal the uninterrupted run's. signal: checkpoint-13 holds the
    val histogram of step 12, which the selection at step 16 of the resumed run draws its thresholds from."""
    from attent_scale.checkpoint import load_state

    signal = strategy == "signal"
    ref = request.getfixturevalue("signal_two_ranks" if signal else "two_ranks")
    save, spec = (13, SIGNAL) if signal else (9, {})
    cut = _run(tmp_path, "cut", 2, batch=4, ga=1, save_steps=save, exchange_every=2, stop_after_step=save + 1,
               **spec)
    assert (cut / f"checkpoint-{save}" / "attent" / "rank1.json").exists()
    assert len(_losses(cut)) == save + 1
    # no evaluation at the resumed start (Trainer's eval_on_start would run one at every train() call)
    _run(tmp_path, "cut", 2, batch=4, ga=1, save_steps=save, exchange_every=2, resume=True,
         **{**spec, "eval_on_start": False})
    assert _shas(cut) == _shas(ref)
    assert _losses(cut) == pytest.approx(_losses(ref), rel=1e-6, abs=1e-7)
    if signal:
        teacher = load_state(cut / f"checkpoint-{save}" / "attent" / "rank1")["teacher"]
        assert teacher["val_step"] == 12 and int(teacher["val_hist"].sum()) == 20
        assert _jsonl(cut / "val.rank1.jsonl") == _jsonl(ref / "val.rank1.jsonl")
        assert sum(r["signal"]["dropped"] for r in read_records(cut / "selection.jsonl")) > 0


def test_signal_val_histogram_and_selection_world_size_independent(tmp_path: Path,
                                                                   signal_two_ranks: Path) -> None:
    """strategy signal: every evaluation's val histogram (per-sample eval losses, the padded repeats of
    the last batch left out) is the same on both ranks and equals one process's; so are the selections,
    on both ranks alike, and they drop something."""
    one = _run(tmp_path, "s1", 1, batch=4, ga=2, **SIGNAL)
    vals = [_jsonl(signal_two_ranks / f"val.rank{r}.jsonl") for r in (0, 1)]
    single = _jsonl(one / "val.rank0.jsonl")
    assert [v["step"] for v in single] == [0, 12, 24, 32]
    assert [v["hist"] for v in vals[0]] == [v["hist"] for v in vals[1]] == [v["hist"] for v in single]
    assert all(sum(v["hist"]) == 20 for v in single)
    epochs = [_jsonl(signal_two_ranks / f"epochs.rank{r}.jsonl") for r in (0, 1)]
    assert epochs[0] == epochs[1] and [e["sha256"] for e in epochs[0][1:]] == _shas(signal_two_ranks)
    assert _shas(one) == _shas(signal_two_ranks) and len(_shas(one)) == 3
    records = read_records(signal_two_ranks / "selection.jsonl")
    assert records[0]["signal"]["dropped"] == 0 and records[-1]["signal"]["dropped"] > 0
    assert all(r["signal"]["val"]["step"] == s for r, s in zip(records, (0, 12, 24), strict=True))


def test_ledger_exchanges_pending_observations_during_an_epoch(two_ranks: Path) -> None:
    """Each rank's observations of ids another rank owns go to their owner every EXCHANGE_EVERY (here 2)
    optimizer steps, as in `attent-scale train`, instead of piling up until the next selection."""
    for rank in (0, 1):
        lines = (two_ranks / f"pending.rank{rank}.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) > 10
        assert all(r["pending"] == 0 for r in rows if r["step"] % 2 == 0), rows  # just exchanged
        assert max(r["pending"] for r in rows) <= 4, rows  # at most the one step's batch of 4 waits


def test_deepspeed_zero3_selection_world_size_independent(tmp_path: Path) -> None:
    one = _run(tmp_path, "ds1", 1, batch=4, ga=2, deepspeed=True)
    two = _run(tmp_path, "ds2", 2, batch=4, ga=1, deepspeed=True)
    shas = _shas(one)
    assert len(shas) == 2 and shas == _shas(two)
    assert _replay(two, 2) == shas


def test_datasets_dataset_ids_are_indices(tmp_path: Path) -> None:
    """A `datasets.Dataset` with a column the model does not take ("source", dropped by Trainer's
    remove_unused_columns): the teacher's ids are the dataset's indices, every batch's rows are the rows
    at its ids, epoch 0 trains on every index once and the subset epoch on exactly the selected count."""
    import datasets
    import torch
    from hf_worker import hard_teacher_config
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, TrainingArguments

    from attent_scale.integrations.hf import AttentTrainer
    from attent_scale.integrations.sampler import ID_KEY, PadCollator

    n, vocab = 40, 64
    rows = [[1 + i % 7] + [2 + (i * 5 + k * (1 + i % 3)) % (vocab - 2) for k in range(6 + i % 9)]
            for i in range(n)]
    source = [f"row {i}" for i in range(n)]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows, "source": source})
    seen: list[tuple[int, int]] = []  # (epoch, id)

    class Checking(AttentTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            ids = inputs[ID_KEY].tolist()
            assert "source" not in inputs
            for j, i in enumerate(ids):
                width = int(inputs["attention_mask"][j].sum())
                assert inputs["input_ids"][j, :width].tolist() == ds[i]["input_ids"], (i, j)
                seen.append((int(self.session.state.epoch), i))
            return super().training_step(model, inputs, *args, **kwargs)

    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
                             learning_rate=3e-3, logging_steps=1, save_strategy="no", seed=0, report_to=[],
                             disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    lora = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_config(config), lora)
    trainer = Checking(model=model, args=args, train_dataset=ds, data_collator=PadCollator(0),
                       teacher_config=hard_teacher_config("ledger"))  # a subset epoch without evaluation
    trainer.train()
    epoch0 = sorted(i for e, i in seen if e == 0)
    epoch1 = [i for e, i in seen if e == 1]
    assert epoch0 == list(range(n))
    selected = [h["attent/selected"] for h in trainer.state.log_history if "attent/selected" in h]
    assert selected[0] == n and 0 < selected[1] < n
    assert len(epoch1) == len(set(epoch1)) == selected[1]
    records = read_records(tmp_path / "selection.jsonl")
    assert records[-1]["epoch"] == 1  # the ids trained are the ones the teacher selected and recorded
    assert Selection.from_ids(np.array(epoch1), n).sha256 == records[-1]["sha256"]


def _tiny_lm(seed: int = 0) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True,
                      task_type="CAUSAL_LM")
    return get_peft_model(AutoModelForCausalLM.from_config(config), lora)


def test_accumulation_with_short_last_batch_one_ce_pass_one_flush_per_step(tmp_path: Path) -> None:
    """Batch 3 x accumulation 4 over 64 rows: 22 batches per epoch (the last has 1 row), so the epoch's
    last step has 2 micro batches (3 + 1 rows). The losses equal plain Trainer's over the same order (its
    gradient is the exact token mean of the step's rows); the model is never handed the labels (one CE
    pass, ours); the per-sample losses reach the teacher once per optimizer step, for every row once."""
    import torch
    from hf_worker import ToyPairs
    from transformers import Trainer, TrainingArguments

    from attent_scale.integrations.hf import AttentTrainer
    from attent_scale.integrations.sampler import PadCollator

    def args(out: Path, **kw: Any) -> TrainingArguments:
        return TrainingArguments(output_dir=str(out), per_device_train_batch_size=3,
                                 gradient_accumulation_steps=4, learning_rate=3e-3,
                                 lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.0,
                                 max_grad_norm=1.0, logging_steps=1,
                                 save_strategy="no", seed=0, report_to=[], disable_tqdm=True, use_cpu=True,
                                 dataloader_num_workers=0, **kw)

    flushes: list[tuple[int, list[int]]] = []
    labelled_forwards = []

    class Recording(AttentTrainer):
        def attent_losses_hook(self, ids: Any, losses: Any, step: int, kind: str) -> None:
            if kind == "train":
                assert losses.device.type == "cpu" and torch.isfinite(losses).all()
                flushes.append((step, ids.tolist()))

    model = _tiny_lm()
    model.register_forward_pre_hook(lambda _m, _a, kw: labelled_forwards.append("labels" in kw) and None,
                                    with_kwargs=True)
    data = ToyPairs()
    attent = Recording(model=model, args=args(tmp_path / "a", num_train_epochs=2), train_dataset=data,
                       data_collator=PadCollator(0))
    attent.train()
    la = [h["loss"] for h in attent.state.log_history if "loss" in h]
    assert labelled_forwards and not any(labelled_forwards)
    assert [s for s, _ in flushes] == list(range(len(la)))  # one flush per optimizer step
    epoch0 = [ids for s, ids in flushes[:6]]
    assert [len(ids) for ids in epoch0] == [12] * 5 + [4]
    assert sorted(i for ids in epoch0 for i in ids) == list(range(N))

    order = epoch_order(np.arange(N), seed=0, epoch=0).tolist()
    plain_args = args(tmp_path / "p", max_steps=len(la), train_sampling_strategy="sequential")
    plain = Trainer(model=_tiny_lm(), args=plain_args, train_dataset=torch.utils.data.Subset(data, order),
                    data_collator=PadCollator(0))
    plain.train()
    lp = [h["loss"] for h in plain.state.log_history if "loss" in h]
    assert la[:6] == pytest.approx(lp[:6], rel=1e-5, abs=1e-6)
