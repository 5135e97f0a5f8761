"""Shards from Hugging Face / GGUF tokenizers and instruction (SFT) shards with a loss mask."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attent_scale.data.builder import build_shards
from attent_scale.data.manifest import Manifest
from attent_scale.data.samples import MASK_FIELD, decode, read_samples
from attent_scale.data.stream import ShardStream
from attent_scale.data.tokenizer import HFTokenizer, tree_sha256
from attent_scale.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_runner import REPO, TINY_MODEL, run_train, tiny_run_config  # noqa: E402

EOS = "<|endoftext|>"
TEXTS = [f"line {i}: the quick brown fox\n  jumps\tover {i * 7} lazy dogs.\n\n" for i in range(200)]


def bpe_tokenizer(root: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer.json (GPT-2 style) trained here, with tokenizer_config.json beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXTS, trainer)
    root.mkdir(parents=True, exist_ok=True)
    tk.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "bos_token": EOS}))
    return root


def word_tokenizer(path: Path, words: list[str]) -> Path:
    """A bare tokenizer.json: one id per whitespace-separated word, EOS first."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {EOS: 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken(EOS, special=True)])
    tk.save(str(path))
    return path


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def samples_of(m: Manifest, split: str = "train") -> list:
    out = []
    for s in m.shards(split):
        with open(m.shard_path(s), "rb") as f:
            for raw in read_samples(f):
                out.append((raw, decode(raw, np.dtype(m.token_dtype), m.seq_len, m.vocab_size)))
    return out


@pytest.fixture(scope="module")
def hf_built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    tmp = tmp_path_factory.mktemp("hf")
    tok = bpe_tokenizer(tmp / "tok")
    data = jsonl(tmp / "c.jsonl", [{"text": t} for t in TEXTS])
    m = build_shards([data], tmp / "shards", seq_len=16, tokenizer=tok, text_field="text", val_fraction=0.1,
                     progress=False, workers=1)
    return tok, m


def test_hf_tokenizer_shards_keep_the_text_and_its_own_eos(hf_built: tuple[Path, Manifest]) -> None:
    tok, m = hf_built
    tk = HFTokenizer(m.tokenizer_source)  # the saved copy loads with AutoTokenizer
    assert (m.tokenizer_kind, m.token_dtype, m.newline_symbol) == ("hf", "uint16", None)
    assert m.eos_id == tk.tk.convert_tokens_to_ids(EOS) and m.pad_id == m.eos_id
    assert m.vocab_size == len(tk.tk) == 300
    for text in TEXTS[:5] + ["a\n\n  b\t\tc  ", "tabs\tand  spaces\n"]:
        assert tk.decode(tk.encode(text)) == text
    # the windows' tokens, joined, are the train documents' text with EOS between them: nothing remapped
    samples = samples_of(m)
    stream = np.concatenate([samples[0][1].tokens] + [s.tokens[1:] for _, s in samples[1:]])
    docs = tk.decode(stream.tolist()).split(EOS)
    assert docs[-1] == "" and all(d in TEXTS for d in docs[:-1]), docs[:3]
    assert len(docs) - 1 == m.raw["splits"]["train"]["documents"]


def test_manifest_records_tokenizer_kind_and_hash(hf_built: tuple[Path, Manifest], tmp_path: Path) -> None:
    tok, m = hf_built
    rec = m.raw["tokenizer"]
    assert rec["kind"] == "hf" and rec["dir"] == "tokenizer" and rec["file"] == "tokenizer/tokenizer.json"
    assert rec["sha256"] == tree_sha256(m.dir / "tokenizer") == m.tokenizer_sha256
    assert rec["source"] == {"name": tok.name, "sha256": tree_sha256(tok)}
    # a changed saved tokenizer (its config, not only tokenizer.json) is caught
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(m.dir, copy)
    cfg = copy / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace(EOS, "[X]", 1))
    out = subprocess.run([sys.executable, "-m", "attent_scale", "shards", "inspect", str(copy), "--verify"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "BAD tokenizer: sha256 mismatch" in out.stdout, out.stdout + out.stderr


def test_vocab_over_65535_stores_u32(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(70_000)]
    tok = word_tokenizer(tmp_path / "tokenizer.json", words)  # bare tokenizer.json: EOS found by name
    data = jsonl(tmp_path / "c.jsonl", [{"text": f"w{i} w69999 w{i + 1}"} for i in range(0, 400, 2)])
    m = build_shards([data], tmp_path / "shards", seq_len=8, tokenizer=tok, text_field="text",
                     val_fraction=0.0, progress=False, workers=1)
    assert m.vocab_size == 70_002 and m.token_dtype == "uint32" and m.raw["token_field"] == "tokens.u32"
    samples = samples_of(m)
    assert all(raw.fields.keys() == {"tokens.u32"} for raw, _ in samples)
    ids = np.concatenate([s.tokens for _, s in samples])
    assert int(ids.max()) == 70_001 and m.eos_id == 0  # w69999, above what u16 holds


def test_vocab_larger_than_the_model_is_a_one_line_error_at_train_start(
        hf_built: tuple[Path, Manifest], tmp_path: Path) -> None:
    _, m = hf_built
    cfg = tiny_run_config(tmp_path / "run", m.dir)
    cfg["model"]["config"] = dict(TINY_MODEL, vocab_size=256, n_positions=16)
    proc = run_train(cfg, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "256" in lines[-1] and str(m.vocab_size) in lines[-1] and "vocab_size" in lines[-1], lines[-1]


def test_export_of_a_model_from_config_carries_the_shards_hf_tokenizer(
        hf_built: tuple[Path, Manifest], tmp_path: Path) -> None:
    """A model built from model.config on HF-tokenizer shards exports with that tokenizer beside it."""
    from transformers import AutoTokenizer

    tok, m = hf_built
    cfg = tiny_run_config(tmp_path / "run", m.dir)
    cfg["model"]["config"] = dict(TINY_MODEL, vocab_size=m.vocab_size, n_positions=16)
    cfg["train"]["max_steps"] = 2
    cfg["checkpoint"]["export"] = True
    proc = run_train(cfg, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    export = tmp_path / "run" / "export"
    info = json.loads((export / "export.json").read_text())
    assert info["tokenizer"].startswith("saved: the shards' tokenizer"), info
    loaded = AutoTokenizer.from_pretrained(str(export / info["dirs"][0]))
    source = AutoTokenizer.from_pretrained(str(tok))
    assert loaded(TEXTS[3])["input_ids"] == source(TEXTS[3])["input_ids"]


# ---------------------------------------------------------------------------------------- SFT

WORDS = ["alpha", "beta", "gamma", "zeta", "delta", "epsilon", "eta", "theta", "iota", "kappa"]


def sft_build(tmp: Path, rows: list[dict], name: str, seq_len: int = 12) -> Manifest:
    tok = tmp / "words.json"
    if not tok.exists():
        word_tokenizer(tok, WORDS)
    return build_shards([jsonl(tmp / f"{name}.jsonl", rows)], tmp / name, seq_len=seq_len, tokenizer=tok,
                        prompt_field="q", response_field="a", val_fraction=0.0, progress=False, workers=1)


def losses(m: Manifest) -> dict[int, float]:
    """The engine's per-sample loss (what the teacher ranks) of every train sample, by id, for a model
    whose every position sees only its own token (no attention layers): a token can only reach the loss
    as a target."""
    from attent_scale.config import config_from_dict
    from attent_scale.engines import build_engine

    model = {"model_type": "gpt2", "n_layer": 0, "n_embd": 16, "n_head": 2, "n_positions": 16}
    engine = build_engine(config_from_dict({"model": {"config": model}, "engine": {"name": "local"}}),
                          vocab_size=m.vocab_size)
    stream = ShardStream(m.dir, split="train", batch_size=m.num_samples("train"), seed=0)
    batch = next(iter(stream))
    with torch.no_grad():
        loss = engine.per_sample_loss(batch)
    return dict(zip(batch["ids"].tolist(), loss.tolist(), strict=True))


def test_sft_prompt_tokens_are_not_in_the_per_sample_loss(tmp_path: Path) -> None:
    base = [{"q": "alpha beta gamma alpha", "a": "delta epsilon eta"},
            {"q": "beta beta", "a": "theta iota kappa"}]
    prompt_changed = [dict(base[0], q="alpha zeta gamma alpha"), base[1]]
    response_changed = [dict(base[0], a="delta kappa eta"), base[1]]
    m = sft_build(tmp_path, base, "base")
    raw, s = samples_of(m)[0]
    assert set(raw.fields) == {"tokens.u32" if m.token_dtype == "uint32" else "tokens.u16", MASK_FIELD}
    # prompt (4 words) masked, response (3 words + EOS) the targets
    assert s.mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert s.labels.tolist() == [-100, -100, -100] + s.tokens[4:].tolist()
    batch = next(iter(ShardStream(m.dir, split="train", batch_size=2, seed=0)))
    row = batch["ids"].tolist().index(0)
    assert batch["labels"][row, :7].tolist() == s.labels.tolist() and (batch["labels"][row, 7:] == -100).all()
    ref = losses(m)
    same = losses(sft_build(tmp_path, prompt_changed, "prompt"))
    other = losses(sft_build(tmp_path, response_changed, "response"))
    assert same[0] == pytest.approx(ref[0], abs=1e-6) and same[1] == pytest.approx(ref[1], abs=1e-6)
    assert abs(other[0] - ref[0]) > 1e-3 and other[1] == pytest.approx(ref[1], abs=1e-6)


def test_sft_examples_are_not_packed_and_are_truncated_or_skipped_counted(tmp_path: Path) -> None:
    rows = [{"q": "alpha", "a": "beta gamma"},
            {"q": " ".join(["zeta"] * 12), "a": "delta"},  # no response token within seq_len + 1: skipped
            {"q": "eta theta", "a": " ".join(["iota"] * 20)}]  # cut to seq_len + 1
    m = sft_build(tmp_path, rows, "cut", seq_len=8)
    sft = m.raw["build"]["sft"]
    assert (sft["skipped"], sft["truncated"]) == (1, 1) and m.num_samples("train") == 2
    (_, a), (_, b) = samples_of(m)
    assert len(a.tokens) == 4 and len(b.tokens) == 9 and b.mask.tolist() == [0, 0] + [1] * 7


def test_sft_flags_are_checked(tmp_path: Path) -> None:
    data = jsonl(tmp_path / "c.jsonl", [{"q": "alpha", "a": "beta"}])
    tok = word_tokenizer(tmp_path / "w.json", WORDS)
    with pytest.raises(UserError, match="give both"):
        build_shards([data], tmp_path / "o", tokenizer=tok, prompt_field="q", progress=False)
    with pytest.raises(UserError, match=r"--chat-template: .*w\.json has no chat template"):
        build_shards([data], tmp_path / "o", tokenizer=tok, prompt_field="q", response_field="a",
                     chat_template=True, progress=False)
    with pytest.raises(UserError, match=r"c\.jsonl:1: no field 'b' \(--response-field\)"):
        build_shards([data], tmp_path / "o", tokenizer=tok, prompt_field="q", response_field="b",
                     progress=False, workers=1)
    with pytest.raises(UserError, match=r"c\.jsonl:1: no field 'p' \(set --prompt-field\)"):
        build_shards([data], tmp_path / "o", tokenizer=tok, prompt_field="p", response_field="a",
                     progress=False, workers=1)
    with pytest.raises(UserError, match=r"--text-field: not with --prompt-field"):
        build_shards([data], tmp_path / "o", tokenizer=tok, prompt_field="q", response_field="a",
                     text_field="q", progress=False)


def test_smollm2_gguf_tokenizer_chat_template_shards(smollm2_sft_shards: Path) -> None:
    m = Manifest.load(smollm2_sft_shards)
    assert (m.tokenizer_kind, m.vocab_size, m.token_dtype) == ("gguf", 49_152, "uint16")
    tk = HFTokenizer(m.tokenizer_source)
    assert tk.tk.eos_token == "<|im_end|>" and m.eos_id == tk.eos_id and m.pad_id == m.eos_id
    assert m.raw["tokenizer"]["source"]["name"].endswith(".gguf") and m.raw["tokenizer"]["chat_template"]
    for _, s in samples_of(m):
        text = tk.decode(s.tokens.tolist())
        prompt = tk.decode(s.tokens[s.mask == 0].tolist())
        response = tk.decode(s.tokens[s.mask == 1].tolist())
        assert text == prompt + response and prompt.endswith("<|im_start|>assistant\n"), text
        assert "<|im_start|>user\n" in prompt and response.endswith("<|im_end|>\n"), response
    text = "Hello,\n\tworld  and  spaces\n"
    assert tk.decode(tk.encode(text)) == text


def test_sft_hf_build_with_2_workers_and_with_parts_gives_the_same_bytes(tmp_path: Path) -> None:
    import hashlib

    from attent_scale.cli import main

    def digest(d: Path) -> dict[str, str]:
        return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(d.rglob("*")) if p.is_file()}

    tok = bpe_tokenizer(tmp_path / "tok")
    src = tmp_path / "src"
    src.mkdir()
    for k in range(3):
        jsonl(src / f"{k}.jsonl", [{"q": f"q{k}-{i}: {TEXTS[i][:10]}", "a": f"answer\n\t{i * k} dogs"}
                                   for i in range(k * 20, k * 20 + 20)])
    opts = ["--tokenizer", str(tok), "--prompt-field", "q", "--response-field", "a", "--seq-len", "32",
            "--samples-per-shard", "9", "--val-fraction", "0.2", "--no-progress"]
    assert main(["shards", "build", str(src), "-o", str(tmp_path / "w2"), "--workers", "2", *opts]) == 0
    parts = []
    for i in (1, 0):
        parts.append(str(tmp_path / f"part{i}"))
        assert main(["shards", "build", str(src), "-o", parts[-1], "--part", f"{i}/2", "--workers", "1",
                     *opts]) == 0
    assert main(["shards", "merge", *parts, "-o", str(tmp_path / "merged"), "--workers", "1"]) == 0
    d1 = digest(tmp_path / "w2")
    assert d1 == digest(tmp_path / "merged")
    assert "tokenizer/tokenizer.json" in d1 and sum(n.startswith("train-") for n in d1) >= 4
    m = Manifest.load(tmp_path / "w2")
    assert m.sft and m.num_samples("train") + m.num_samples("val") == 60
    assert main(["shards", "inspect", str(tmp_path / "w2"), "--verify"]) == 0


def _sft_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"id": i, "q": " ".join(WORDS[(i * 3 + seed + k) % 5] for k in range(1 + i % 4)),
             "a": " ".join(WORDS[5 + (i + seed + k) % 5] for k in range(1 + i % 3))} for i in range(n)]


def test_sft_from_parquet_gives_the_same_shards_as_jsonl(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = word_tokenizer(tmp_path / "w.json", WORDS)
    rows = _sft_rows(40)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=7)
    opts = dict(tokenizer=tok, prompt_field="q", response_field="a", seq_len=8, samples_per_shard=9,
                val_fraction=0.2, progress=False)
    a = build_shards([jsonl(tmp_path / "d.jsonl", rows)], tmp_path / "j", workers=1, **opts)
    b = build_shards([tmp_path / "d.parquet"], tmp_path / "p", workers=2, **opts)
    tars = sorted(p.name for p in a.dir.glob("*.tar"))
    assert len(tars) >= 5 and tars == sorted(p.name for p in b.dir.glob("*.tar"))
    assert all((a.dir / t).read_bytes() == (b.dir / t).read_bytes() for t in tars)
    assert b.sft and b.num_samples("train") + b.num_samples("val") == 40 and b.num_samples("val") > 0
    with pytest.raises(UserError, match=r"d\.parquet:row 0: no field 'b' \(--response-field\)$"):
        build_shards([tmp_path / "d.parquet"], tmp_path / "o", workers=1, **dict(opts, response_field="b"))


def test_sft_val_input_is_the_val_split(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from attent_scale.cli import main

    tok = word_tokenizer(tmp_path / "w.json", WORDS)
    train, val = _sft_rows(30), _sft_rows(6, seed=1)
    jsonl(tmp_path / "train.jsonl", train)
    pq.write_table(pa.Table.from_pylist(val), tmp_path / "val.parquet")
    assert main(["shards", "build", str(tmp_path / "train.jsonl"), "--val-input",
                 str(tmp_path / "val.parquet"), "-o", str(tmp_path / "s"), "--tokenizer", str(tok),
                 "--prompt-field", "q", "--response-field", "a", "--seq-len", "8", "--workers", "1",
                 "--no-progress"]) == 0
    m = Manifest.load(tmp_path / "s")
    assert m.raw["build"]["val_input"] is True and m.raw["build"]["val_fraction"] == 0.0
    assert (m.num_samples("train"), m.num_samples("val")) == (30, 6)
    ids = {w: i + 2 for i, w in enumerate(WORDS)}
    for (_, s), r in zip(samples_of(m, "val"), val, strict=True):  # the val records, in order, as given
        assert s.tokens.tolist() == [ids[w] for w in f"{r['q']} {r['a']}".split()] + [0]
        assert s.mask.tolist() == [0] * len(r["q"].split()) + [1] * (len(r["a"].split()) + 1)
