"""One teacher path for three trainers: `attent-scale train`'s Trainer, the HF AttentTrainer and Lightning's
AttentCallback (on 2 real ranks) select the same ids for the losses they recorded (prune + reweight, anneal,
excess), and weight the loss alike."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from attent_scale.config import TeacherConfig
from attent_scale.errors import UserError
from attent_scale.teacher import Batching, Budget, Selection, Teacher, TeacherSession, read_records
from attent_scale.teacher.ledger import TRAIN, Ledger

EPOCHS = 4
# epoch 0 full (warm-up), 1-2 prune the ids below the median excess loss (weights on the kept ones),
# epoch 3 the anneal: all data, weight 1
CONFIG = dict(mode="ledger", strategy="prune", warmup_epochs=1, prune_ratio=0.5, prune_quantile=0.5,
              reweight=True, anneal_fraction=0.25, score="excess")


_UNPATCHED_OBSERVE = Ledger.observe
_UNPATCHED_OBSERVE_VAL = Teacher.observe_val


class _Capture:
    """Every observation the teacher's ledger gets (ids, losses, step, kind) and the per-sample weights
    every trained batch's loss asked the teacher session for (epoch, ids, weights), in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[np.ndarray, np.ndarray, int, int]] = []
        self.vals: list[tuple[np.ndarray, int]] = []  # every val histogram the teacher gets, with its step
        self.weights: list[tuple[int, np.ndarray, np.ndarray]] = []  # (epoch, ids, weights)
        observe = Ledger.observe
        events = self.events

        def recording(led: Ledger, ids: Any, losses: Any, step: int, kind: int = TRAIN) -> int:
            ids_np = np.asarray(ids.numpy() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
            loss_np = np.asarray(losses.numpy() if isinstance(losses, torch.Tensor) else losses, np.float32)
            events.append((ids_np.copy(), loss_np.copy(), int(step), int(kind)))
            return observe(led, ids, losses, step, kind=kind)

        monkeypatch.setattr(Ledger, "observe", recording)
        vals = self.vals

        def recording_val(teacher: Teacher, hist: np.ndarray, step: int) -> None:
            vals.append((np.asarray(hist, dtype=np.int64).copy(), int(step)))
            _UNPATCHED_OBSERVE_VAL(teacher, hist, step)

        monkeypatch.setattr(Teacher, "observe_val", recording_val)
        weights, rows = TeacherSession.loss_weights, self.weights

        def recording_weights(session: TeacherSession, ids: torch.Tensor) -> torch.Tensor | None:
            w = weights(session, ids)
            ids_np = ids.cpu().numpy().copy()
            got = np.ones(len(ids_np), np.float32) if w is None else w.cpu().numpy().copy()
            real = ids_np >= 0
            rows.append((int(session.state.epoch), ids_np[real], got[real]))
            return w

        monkeypatch.setattr(TeacherSession, "loss_weights", recording_weights)


def _replay(cfg: TeacherConfig, n: int, events: list, starts: dict[int, int], reference: Any,
            vals: list[tuple[np.ndarray, int]] = ()) -> dict[int, Selection]:
    """A fresh teacher session fed the recorded observations (the unpatched ledger) and val histograms
    (`vals`: (hist, step), an evaluation at a subset epoch's first step comes before its selection),
    through the shared epoch start at each subset epoch's first step (`starts`: epoch -> step): epoch ->
    its selection. prune and signal score nothing at an epoch start, so the observations before that
    step are all they rank."""
    session = TeacherSession.build(cfg, num_samples=n, seed=0, batching=Batching(1, 8),
                                   budget=Budget(epochs=EPOCHS), split="train", reference=reference)
    teacher = session.teacher
    out, i, j = {}, 0, 0
    for epoch in range(EPOCHS):
        if not teacher.plan_epoch(epoch).subset:
            continue
        step = starts[epoch]
        while i < len(events) and events[i][2] < step:
            ids, losses, s, kind = events[i]
            _UNPATCHED_OBSERVE(teacher.ledger, ids, losses, s, kind=kind)
            i += 1
        while j < len(vals) and vals[j][1] <= step:
            _UNPATCHED_OBSERVE_VAL(teacher, *vals[j])
            j += 1
        out[epoch] = session.begin_epoch(epoch, step).selection
    return out


def _check_against_replay(cfg: TeacherConfig, n: int, cap: _Capture, records: list[dict],
                          reference: Any) -> None:
    assert [r["epoch"] for r in records] == [1, 2]  # epoch 3 is the anneal: no selection
    starts = {r["epoch"]: r["step"] for r in records}
    events = list(cap.events)
    want = _replay(cfg, n, events, starts, reference)
    assert [want[r["epoch"]].sha256 for r in records] == [r["sha256"] for r in records]
    # excess, not the raw loss: the same losses ranked without the reference prune other ids
    raw = _replay(dataclasses.replace(cfg, score="loss"), n, events, starts, None)
    assert len(cap.events) == len(events)  # the replays fed the unpatched ledger
    assert [raw[e].sha256 for e in (1, 2)] != [want[e].sha256 for e in (1, 2)]
    # every trained batch carried its selection's weights (some ids 2.0), all data weight 1 outside
    seen_weighted = False
    for epoch, ids, w in cap.weights:
        if epoch in want:
            np.testing.assert_array_equal(w, want[epoch].sample_weights(ids).numpy())
            seen_weighted |= bool((w != 1).any())
            assert want[epoch].mask(ids).all()
        else:
            assert (w == 1).all()
    assert seen_weighted and {e for e, _, _ in cap.weights} == set(range(EPOCHS))


def _reference_losses(n: int) -> np.ndarray:
    return np.random.default_rng(7).uniform(0.0, 3.0, n).astype(np.float32)


def test_train_trainer_selects_by_the_shared_epoch_start(tmp_path: Path, tiny_shards: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from train_runner import tiny_run_config

    from attent_scale.config import config_from_dict
    from attent_scale.data import Manifest
    from attent_scale.score import write_scores
    from attent_scale.teacher.reference import Reference, scores_metadata
    from attent_scale.train import Trainer, train

    m = Manifest.load(tiny_shards)
    n = m.num_samples("train")
    ref_loss = _reference_losses(n)
    scores = tmp_path / "ref.safetensors"
    write_scores(scores, ref_loss, scores_metadata(m, "train", "0" * 64))
    teacher = {**CONFIG, "reference": str(scores)}
    raw = tiny_run_config(tmp_path / "run", tiny_shards, teacher=teacher,
                          train={"max_steps": 10_000, "max_epochs": EPOCHS, "log_every": 50},
                          eval={"every_steps": 0, "max_batches": 1, "batch_size": 16})
    cap = _Capture(monkeypatch)
    step = Trainer.train_step

    def checked_step(self: Trainer, batch: dict[str, Any], stream: Any) -> bool:
        assert "weights" not in batch  # the loss weights come from the teacher session alone
        return step(self, batch, stream)

    monkeypatch.setattr(Trainer, "train_step", checked_step)
    assert train(config_from_dict(raw)) == 0
    records = read_records(tmp_path / "run" / "selection.jsonl")
    _check_against_replay(TeacherConfig(**teacher), n, cap, records, Reference(scores, m, "train"))


# strategy signal: the default teacher with wider learned / unlearnable quantiles (tiny runs drop some)
SIGNAL = dict(mode="ledger", strategy="signal", signal="gap+learn", ratio_schedule="constant",
              initial_ratio=0.2, warmup_epochs=1, signal_learned_quantile=0.3,
              signal_unlearnable_quantile=0.7)


def _check_signal_replay(cfg: TeacherConfig, n: int, cap: _Capture, records: list[dict]) -> None:
    """The run's selections equal a fresh Teacher's fed the same training losses and val histograms
    through the shared epoch start, something was dropped, and without the histograms nothing would be."""
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["signal"]["dropped"] > 0
    starts = {r["epoch"]: r["step"] for r in records}
    assert [r["signal"]["val"]["step"] for r in records] == [max(s for _, s in cap.vals if s <= r["step"])
                                                              for r in records]
    want = _replay(cfg, n, list(cap.events), starts, None, list(cap.vals))
    assert [want[r["epoch"]].sha256 for r in records] == [r["sha256"] for r in records]
    blind = _replay(cfg, n, list(cap.events), starts, None)
    assert all(blind[e] is None or blind[e].count == n for e in blind)


def test_train_trainer_signal_selects_as_the_teacher_does(tmp_path: Path, tiny_shards: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """strategy signal through `attent-scale train`'s Trainer (an evaluation every 10 steps): the same
    check as AttentTrainer's below."""
    from train_runner import tiny_run_config

    from attent_scale.config import config_from_dict
    from attent_scale.data import Manifest
    from attent_scale.train import train

    n = Manifest.load(tiny_shards).num_samples("train")
    raw = tiny_run_config(tmp_path / "run", tiny_shards, teacher=SIGNAL,
                          train={"max_steps": 10_000, "max_epochs": EPOCHS, "log_every": 50},
                          eval={"every_steps": 10, "max_batches": 2, "batch_size": 16})
    cap = _Capture(monkeypatch)
    assert train(config_from_dict(raw)) == 0
    assert cap.vals and all(int(h.sum()) == 32 for h, _ in cap.vals)
    _check_signal_replay(TeacherConfig(**SIGNAL), n, cap, read_records(tmp_path / "run" / "selection.jsonl"))


def _tiny_lm() -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True,
                      task_type="CAUSAL_LM")
    return get_peft_model(AutoModelForCausalLM.from_config(config), lora)


def _hf_trainer(out: Path, teacher: TeacherConfig | None, reference: Any = None, epochs: int = EPOCHS,
                max_steps: int = -1, args_kw: dict[str, Any] | None = None, **kw: Any) -> Any:
    from hf_worker import ToyPairs
    from transformers import TrainingArguments

    from attent_scale.integrations.hf import AttentTrainer
    from attent_scale.integrations.sampler import PadCollator

    args = TrainingArguments(output_dir=str(out), num_train_epochs=epochs, max_steps=max_steps,
                             per_device_train_batch_size=8,
                             learning_rate=3e-3, logging_steps=1, save_strategy="no", seed=0, report_to=[],
                             disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, **(args_kw or {}))
    return AttentTrainer(model=_tiny_lm(), args=args, train_dataset=ToyPairs(), data_collator=PadCollator(0),
                         teacher_config=teacher, reference=reference, **kw)


def test_attent_trainer_selects_by_the_shared_epoch_start(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_worker import N_SAMPLES

    from attent_scale.teacher.reference import LossArray

    ref_loss = _reference_losses(N_SAMPLES)
    cfg = TeacherConfig(**CONFIG)
    cap = _Capture(monkeypatch)
    trainer = _hf_trainer(tmp_path, cfg, reference=ref_loss)
    trainer.train()
    records = read_records(tmp_path / "selection.jsonl")
    _check_against_replay(cfg, N_SAMPLES, cap, records, LossArray(ref_loss, N_SAMPLES))
    # the LR schedule's length is the plan's (Teacher.planned_count, prune kept counts included)
    steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.max_steps == len(steps) == 8 + 6 + 6 + 8


def test_attent_trainer_signal_selects_as_the_teacher_does(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """strategy signal (SIGNAL: the default teacher, wider quantiles) with an evaluation every epoch:
    AttentTrainer's selections equal a fresh Teacher's (as `attent-scale train` drives it) fed the same
    training losses and the same val histograms through the shared epoch start; without the histograms
    that teacher would drop nothing."""
    from hf_worker import N_SAMPLES, ToyPairs

    from attent_scale.integrations.hf import default_teacher_config

    cfg = dataclasses.replace(default_teacher_config(), **SIGNAL)
    cap = _Capture(monkeypatch)
    trainer = _hf_trainer(tmp_path, cfg, eval_dataset=ToyPairs(20, seed=1),
                          args_kw={"eval_strategy": "epoch"})
    trainer.train()
    records = read_records(tmp_path / "selection.jsonl")
    # an evaluation at every epoch's end, the step the next epoch's selection is made at
    assert [s for _, s in cap.vals] == [r["step"] for r in records] + [trainer.state.global_step]
    assert all(int(h.sum()) == 20 for h, _ in cap.vals)
    _check_signal_replay(cfg, N_SAMPLES, cap, records)


def test_signal_eval_loss_unchanged_and_histogram_of_per_sample_losses(tmp_path: Path) -> None:
    """AttentTrainer.evaluate with strategy signal reports Trainer's own eval loss and hands the teacher
    the histogram of the per-sample losses (per_sample_loss_fn on the eval outputs; 20 rows, batches of
    8, 8, 4) at the current step; another eval set passed to evaluate() is not the teacher's."""
    from hf_worker import ToyPairs
    from transformers import Trainer, TrainingArguments

    from attent_scale.integrations.hf import causal_lm_per_sample, default_teacher_config
    from attent_scale.integrations.sampler import PadCollator
    from attent_scale.teacher.signals import histogram

    val = ToyPairs(20, seed=1)
    trainer = _hf_trainer(tmp_path / "a", default_teacher_config(), eval_dataset=val,
                          args_kw={"per_device_eval_batch_size": 8})
    got = trainer.evaluate()
    args = TrainingArguments(output_dir=str(tmp_path / "p"), per_device_eval_batch_size=8, report_to=[],
                             use_cpu=True, disable_tqdm=True)
    plain = Trainer(model=_tiny_lm(), args=args, eval_dataset=val, data_collator=PadCollator(0))
    assert got["eval_loss"] == plain.evaluate()["eval_loss"]
    want = np.zeros_like(trainer.teacher.val_hist)
    model = trainer.model.eval()
    for start in range(0, 20, 8):
        batch = PadCollator(0)([val[i] for i in range(start, min(20, start + 8))])
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        want += histogram(causal_lm_per_sample(out, batch))
    assert trainer.teacher.val_step == 0 and int(want.sum()) == 20
    np.testing.assert_array_equal(trainer.teacher.val_hist, want)
    trainer.evaluate(eval_dataset=ToyPairs(8, seed=2))
    np.testing.assert_array_equal(trainer.teacher.val_hist, want)


def test_signal_without_evaluation_warns_it_keeps_every_sample(tmp_path: Path,
                                                               capfd: pytest.CaptureFixture) -> None:
    from attent_scale.integrations.hf import default_teacher_config

    trainer = _hf_trainer(tmp_path, default_teacher_config(), epochs=2)
    trainer.train()
    err = capfd.readouterr().err
    assert err.count("teacher.strategy 'signal' without evaluation") == 1 and "keeps every sample" in err
    assert read_records(tmp_path / "selection.jsonl")[0]["signal"]["dropped"] == 0


def test_weighted_loss_is_the_weighted_token_mean(tmp_path: Path) -> None:
    """AttentTrainer's loss in a weighted epoch: sum_i w_i * CE_sum_i / tokens (engines' weighted token
    mean), while the teacher still gets the unweighted per-sample losses."""
    import torch.nn.functional as F
    from hf_worker import ToyPairs

    from attent_scale.integrations.sampler import PadCollator

    trainer = _hf_trainer(tmp_path, TeacherConfig(**{**CONFIG, "score": "loss"}))
    data = ToyPairs()
    ids = torch.tensor([3, 10, 17, 42], dtype=torch.int64)
    batch = PadCollator(0)([data[int(i)] for i in ids])
    up = Selection.from_ids(torch.tensor([10, 42]), len(data))
    state = trainer.session.state  # an epoch resumed with this weighted selection
    state.epoch, state.bits, state.weight_bits, state.weight = 0, Selection.full(len(data)).bits, up.bits, 2.5
    trainer.session.begin_epoch(0, 0, resumed=True)
    trainer._ids = ids
    model = trainer.model
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["logits"]
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                             ignore_index=-100, reduction="none").view(targets.shape).sum(1)
        tokens = (targets != -100).sum(1)
    w = torch.tensor([1.0, 2.5, 1.0, 2.5])
    assert loss.item() == pytest.approx(float((w * ce).sum() / tokens.sum()), rel=1e-5)
    ((_, per_sample, _),) = trainer._step_losses
    assert per_sample.tolist() == pytest.approx((ce / tokens).tolist(), rel=1e-5)


@pytest.mark.parametrize("bad,key", [
    (dict(initial_ratio=1.5), "teacher.initial_ratio"),
    (dict(strategy="hardest"), "teacher.strategy"),
    (dict(prune_ratio=1.0, strategy="prune"), "teacher.prune_ratio"),
    (dict(initial_interval=3, max_interval=2), "teacher.max_interval"),
    (dict(score="excess"), "teacher.reference"),
    (dict(temperature="hot"), "teacher.temperature"),
])
def test_bad_teacher_config_in_python_raises_through_attent_trainer(tmp_path: Path, bad: dict,
                                                                    key: str) -> None:
    cfg = TeacherConfig(**{"mode": "ledger", **bad})
    with pytest.raises(UserError, match=f"config key '{key}'"):
        _hf_trainer(tmp_path, cfg)


def test_weighting_strategy_needs_the_built_in_loss(tmp_path: Path) -> None:
    from attent_scale.integrations.hf import causal_lm_per_sample

    with pytest.raises(UserError, match="weights the loss per sample"):
        _hf_trainer(tmp_path, TeacherConfig(**{**CONFIG, "score": "loss"}),
                    per_sample_loss_fn=lambda o, i: causal_lm_per_sample(o, i))


def test_steps_budget_anneal_ends_the_subset_epoch(tmp_path: Path) -> None:
    """max_steps 20, anneal_fraction 0.3: from step 14 on all data with weight 1, so the subset epoch 1
    (51 of 64 ids, 7 steps from step 9) ends after its 6th step and epoch 2 trains every id (as
    `attent-scale train` ends a subset epoch at the anneal point)."""
    cfg = TeacherConfig(mode="ledger", strategy="hard", warmup_epochs=1, ratio_schedule="constant",
                        initial_ratio=0.8, final_ratio=0.8, anneal_fraction=0.3)
    trainer = _hf_trainer(tmp_path, cfg, epochs=1, max_steps=20)
    trainer.train()
    hist = trainer.state.log_history
    starts = [(h["attent/epoch"], h["attent/selected"], h["step"]) for h in hist if "attent/epoch" in h]
    assert starts == [(0, 64, 0), (1, 51, 8), (2, 64, 14)]  # epoch 1 trained 6 of its 7 steps
    assert [r["epoch"] for r in read_records(tmp_path / "selection.jsonl")] == [1]
    assert trainer.state.global_step == 20 and trainer.teacher.anneal_from == 2


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_lightning_selects_by_the_shared_epoch_start_on_two_ranks(tmp_path: Path) -> None:
    """The third trainer: AttentCallback on 2 real ranks (torchrun, gloo, Lightning ddp) with the teacher
    of the two tests above. Both ranks hold the same selection each epoch; the records equal a fresh
    single-process session fed the losses both ranks recorded (the replay the other trainers pass), every
    batch carried its selection's weights, and the epochs are the plan's length on 2 ranks."""
    from hf_worker import N_SAMPLES
    from lightning_worker import launch

    from attent_scale.teacher.reference import LossArray

    out = launch(tmp_path, "pl", 2, teacher=CONFIG, reference=True, epochs=EPOCHS)
    per_rank = [_jsonl(out / f"epochs.rank{r}.jsonl") for r in range(2)]
    assert per_rank[0] == per_rank[1] and [e["epoch"] for e in per_rank[0]] == list(range(EPOCHS))
    events, weights = [], []
    for r in range(2):
        events += [(np.asarray(e["ids"], np.int64), np.asarray(e["losses"], np.float32), e["step"], TRAIN)
                   for e in _jsonl(out / f"losses.rank{r}.jsonl")]
        weights += [(e["epoch"], np.asarray(e["ids"], np.int64), np.asarray(e["w"], np.float32))
                    for e in _jsonl(out / f"weights.rank{r}.jsonl")]
    events.sort(key=lambda e: e[2])
    assert len({tuple(e[0]) for e in events}) == len(events)  # each rank's own batches, none twice
    records = read_records(out / "selection.jsonl")
    assert [r["world_size"] for r in records] == [2, 2]
    cap = SimpleNamespace(events=events, weights=weights)
    ref = _reference_losses(N_SAMPLES)
    _check_against_replay(TeacherConfig(**CONFIG), N_SAMPLES, cap, records, LossArray(ref, N_SAMPLES))
    # 64 ids over 2 ranks x batch 8: 4 steps a full epoch, 3 a pruned one (48 ids); the LR knew it
    assert [e["step"] for e in per_rank[0]] == [0, 4, 7, 10]
    assert json.loads((out / "done.json").read_text()) == {"global_step": 14, "total_steps": 14}


@pytest.mark.slow
def test_lightning_signal_selects_as_the_teacher_does_on_two_ranks(tmp_path: Path) -> None:
    """Strategy signal (SIGNAL, as AttentTrainer's test) through AttentCallback on 2 real ranks, validating
    20 held-out rows at every epoch's end (each rank its 10): the teacher gets one histogram of all 20 per
    validation, at the step the next epoch selects at, and the selections equal a fresh session's fed the
    same training losses and histograms; without the histograms it would drop nothing."""
    from hf_worker import N_SAMPLES
    from lightning_worker import launch

    from attent_scale.integrations import default_teacher_config

    cfg = dataclasses.replace(default_teacher_config(), **SIGNAL)
    # batch 4 per rank: 8 steps an epoch, as AttentTrainer's one rank x 8 (fewer steps learn too little to
    # drop anything)
    out = launch(tmp_path, "pl", 2, teacher=dataclasses.asdict(cfg), val=20, epochs=EPOCHS, batch=4)
    vals = [(np.asarray(v["hist"], np.int64), v["step"]) for v in _jsonl(out / "vals.rank0.jsonl")]
    assert _jsonl(out / "vals.rank0.jsonl") == _jsonl(out / "vals.rank1.jsonl")
    events = []
    for r in range(2):
        events += [(np.asarray(e["ids"], np.int64), np.asarray(e["losses"], np.float32), e["step"], TRAIN)
                   for e in _jsonl(out / f"losses.rank{r}.jsonl")]
    events.sort(key=lambda e: e[2])
    records = read_records(out / "selection.jsonl")
    last = json.loads((out / "done.json").read_text())["global_step"]
    assert [s for _, s in vals] == [r["step"] for r in records] + [last]  # every epoch's end, the last too
    assert all(int(h.sum()) == 20 for h, _ in vals)
    _check_signal_replay(cfg, N_SAMPLES, SimpleNamespace(events=events, vals=vals), records)
