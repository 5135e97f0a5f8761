"""tools/ablations/regimes.py: seeded regimes, clean disjoint val, and sample ids mapped to document kinds."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from attent_scale.data.builder import build_shards
from attent_scale.data.manifest import Manifest
from attent_scale.data.tokenizer import Tokenizer

_spec = importlib.util.spec_from_file_location(
    "regimes", Path(__file__).resolve().parents[2] / "tools" / "ablations" / "regimes.py")
regimes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(regimes)


@pytest.fixture(scope="module")
def pool() -> list[dict[str, str]]:
    docs, _ = regimes.load_pool("stdlib", doc_chars=800, max_bytes=120_000)
    return docs


def _build(pool: list[dict[str, str]], regime: str, seed: int = 0, rate: float = 0.4) -> dict:
    return regimes.build_regime(pool, regime, rate=rate, max_copies=6, seed=seed, val_fraction=0.1)


def test_seeded_and_deterministic(pool: list[dict[str, str]], tmp_path: Path) -> None:
    a, b, c = _build(pool, "dup"), _build(pool, "dup"), _build(pool, "dup", seed=1)
    assert a == b
    assert a["train"] != c["train"]
    for name, r in (("a", a), ("b", b)):
        regimes.write_regime(tmp_path / name, r, {"seed": 0})
    for f in ("train.jsonl", "val.jsonl", "kinds.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_max_docs_caps_the_pool(pool: list[dict[str, str]]) -> None:
    docs, _ = regimes.load_pool("stdlib", doc_chars=800, max_bytes=120_000, max_docs=5)
    assert docs == pool[:5]


def test_dup_rate_copies_and_edits(pool: list[dict[str, str]]) -> None:
    r = _build(pool, "dup", rate=0.4)
    n = r["originals"]
    kinds = np.array(r["kind"])
    src = np.array(r["source"])
    dup_sources = set(src[kinds == "duplicated"].tolist())
    assert abs(len(dup_sources) - 0.4 * n) <= 1
    assert set(src[kinds == "copy"].tolist()) == dup_sources  # every duplicated doc has a copy, and only they
    occurrences = np.bincount(src[np.isin(kinds, ["duplicated", "copy"])], minlength=n)[sorted(dup_sources)]
    assert occurrences.min() >= 2 and occurrences.max() <= 6
    assert (kinds == "original").sum() == n - len(dup_sources)
    originals = {}  # source -> the first occurrence's text
    for rec, k, s in zip(r["train"], kinds, src, strict=True):
        if k == "duplicated":
            originals[s] = rec["text"]
    edited = [(rec["text"], originals[s]) for rec, k, s, e in
              zip(r["train"], kinds, src, r["edited"], strict=True) if k == "copy" and e]
    exact = sum(1 for k, e in zip(kinds, r["edited"], strict=True) if k == "copy" and not e)
    assert edited and exact
    for text, orig in edited:  # small edits: changed, and (past a few lines) still a near-copy
        assert text != orig
        if len(orig.split()) >= 100:
            assert regimes.overlap(text, regimes.shingles(orig)) >= regimes.NEAR


def test_noise_rate_and_texts(pool: list[dict[str, str]]) -> None:
    r = _build(pool, "noise", rate=0.15)
    n = r["originals"]
    kinds = np.array(r["kind"])
    assert len(r["train"]) == n
    assert abs((kinds == "noise").sum() - 0.15 * n) <= 1
    pool_sh: set[int] = set()
    for d in pool:
        pool_sh |= regimes.shingles(d["text"])
    noise = [rec["text"] for rec, k in zip(r["train"], kinds, strict=True) if k == "noise"]
    for text in noise:  # no run of the original text left
        assert regimes.overlap(text, pool_sh) < 0.2
    assert all(rec in pool for rec, k in zip(r["train"], kinds, strict=True) if k == "original")
    clean = _build(pool, "clean")
    assert set(clean["kind"]) == {"original"} and len(clean["train"]) == n


def test_swapped_responses() -> None:
    recs = [{"prompt": f"What does f{i}() do?", "response": f"It returns {i} squared plus {i}, always."}
            for i in range(40)]
    r = regimes.build_regime(recs, "noise", rate=0.2, max_copies=2, seed=3, val_fraction=0.1)
    swapped = [rec for rec, k in zip(r["train"], r["kind"], strict=True) if k == "swapped"]
    assert len(swapped) == round(0.2 * r["originals"])
    responses = {rec["response"] for rec in swapped}
    for rec in swapped:
        i = int(rec["prompt"].split("f")[1].split("(")[0])
        assert rec["response"] != recs[i]["response"]
    assert len(responses) == len(swapped)  # a permutation among the chosen records


def test_span_noise_inside_every_document_with_its_character_ranges(pool: list[dict[str, str]]) -> None:
    r = regimes.build_regime(pool, "span", rate=0.25, max_copies=2, seed=0, val_fraction=0.1,
                             span_words=(2, 6))
    assert set(r["kind"]) == {"span"} and len(r["train"]) == r["originals"]
    originals = [d for d in pool if d not in r["val"]]  # the train originals, in pool order
    words = replaced = 0
    for rec, src, where in zip(r["train"], r["source"], r["spans"], strict=True):
        before, after = originals[src]["text"], rec["text"]
        assert where and after != before
        # outside its noise spans the text is the original's, whitespace included
        a_words, b_words = regimes._TOKEN.split(after), regimes._TOKEN.split(before)
        assert len(a_words) == len(b_words) and a_words[1::2] == b_words[1::2]
        inside = set()
        for lo, hi in where:
            assert after[lo:hi].strip() == after[lo:hi]  # a span starts and ends on a word
            inside.update(range(lo, hi))
        pos = 0
        for i, (x, y) in enumerate(zip(a_words, b_words, strict=True)):
            if i % 2 == 0 and x:
                words += 1
                noisy = pos in inside
                replaced += noisy
                if not noisy:
                    assert x == y
            pos += len(x)
    assert 0.25 <= replaced / words <= 0.35  # whole spans: the rate, overshot by less than a span per doc
    # the oracle: the same documents in the same order without their spans
    assert r["oracle"] == [originals[s] for s in r["source"]]
    assert r["val"] and all(v in pool for v in r["val"])


def test_oracle_twins_drop_exactly_the_injected_documents(pool: list[dict[str, str]]) -> None:
    dup = _build(pool, "dup")
    assert len(dup["oracle"]) == dup["originals"]  # each original once
    assert sorted(map(json.dumps, dup["oracle"])) == sorted(
        json.dumps(d) for d in pool if d not in dup["val"])
    noise = _build(pool, "noise", rate=0.15)
    assert noise["oracle"] == [rec for rec, k in zip(noise["train"], noise["kind"], strict=True)
                               if k == "original"]
    assert _build(pool, "clean")["oracle"] is None


def test_repeats_keep_the_corpus_own_near_copies_and_val_shares_them(tmp_path: Path) -> None:
    base = "The licence grants you the right to copy and modify this software under these terms " * 4
    docs = [{"text": f"{base}\nproject {i}: a note that is its own, number {i}."} for i in range(12)]
    docs += [{"text": f"An unrelated document {i} about {'cats' if i % 2 else 'dogs'} and more {i} words."}
             for i in range(12)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    pool, skipped = regimes.load_pool(str(corpus), doc_chars=2000, max_bytes=10**6, dedup=False)
    assert skipped == 0 and len(pool) == 24
    assert regimes.load_pool(str(corpus), doc_chars=2000, max_bytes=10**6)[1] == 11  # the default drops them
    r = regimes.build_regime(pool, "repeats", rate=0.5, max_copies=2, seed=0, val_fraction=0.25)
    kinds = r["kind"]
    licence_train = sum("licence" in rec["text"] for rec in r["train"])
    licence_val = sum("licence" in rec["text"] for rec in r["val"])
    assert licence_train >= 2 and licence_val >= 1
    assert kinds.count("repeat") == licence_train - 1  # every licence document after the first
    assert r["val_shares_train"] == licence_val and len(r["val"]) == 6  # kept: sharing them is the regime
    assert r["oracle"] == [rec for rec, k in zip(r["train"], kinds, strict=True) if k == "original"]


def test_sft_regime_with_val_count_and_a_clean_reference_slice(tmp_path: Path) -> None:
    recs = [{"prompt": f"Write the docstring of `m.f{i}()`.", "response": f"Return {i} squared plus {i}."}
            for i in range(60)]
    r = regimes.build_regime(recs, "noise", rate=0.3, max_copies=2, seed=2, val_fraction=0.1, val_docs=20,
                             ref_docs=10)
    assert len(r["val"]) == 20 and len(r["ref"]) == 10 and r["originals"] == 30
    keys = [{(d["prompt"], d["response"]) for d in part} for part in (r["val"], r["ref"], r["oracle"])]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert all(rec in recs for rec in r["val"] + r["ref"])  # clean
    assert r["kind"].count("swapped") == 9 and len(r["oracle"]) == 21
    side = json.loads(regimes.write_regime(tmp_path, r, {"regime": "noise"}).read_text())
    assert side["oracle_file"] == "oracle.jsonl" and side["ref_file"] == "ref.jsonl"
    assert side["ref_docs"] == 10
    ref_lines = [json.loads(x) for x in (tmp_path / "ref.jsonl").read_text().splitlines()]
    assert [(x["prompt"], x["response"]) for x in ref_lines] == [(d["prompt"], d["response"])
                                                                   for d in r["ref"]]
    with pytest.raises(regimes.RegimeError, match="too small"):
        regimes.build_regime(recs, "noise", rate=0.3, max_copies=2, seed=2, val_fraction=0.1, val_docs=50,
                             ref_docs=10)


@pytest.mark.parametrize("regime", ["dup", "noise", "clean"])
def test_val_clean_and_disjoint(pool: list[dict[str, str]], regime: str) -> None:
    r = _build(pool, regime)
    assert r["val"]
    train_sh: set[int] = set()
    for rec in r["train"]:
        train_sh |= regimes.shingles(rec["text"])
    train_norm = {regimes.normalize(rec["text"]) for rec in r["train"]}
    for rec in r["val"]:
        assert regimes.normalize(rec["text"]) not in train_norm
        assert regimes.overlap(rec["text"], train_sh) < regimes.NEAR
        assert rec in pool  # an untouched original


def _stream(shards: Path) -> list[np.ndarray]:
    m = Manifest.load(shards)
    windows = []
    for info in m.shards("train"):
        with tarfile.open(m.shard_path(info)) as tf:
            for member in tf:
                windows.append(np.frombuffer(tf.extractfile(member).read(), dtype=m.raw["token_dtype"]))
    return windows


@pytest.mark.parametrize("val_input", [True, False])
def test_kinds_of_samples(tiny_shards: Path, tmp_path: Path, val_input: bool) -> None:
    corpus = "prose" if Path("/usr/share/common-licenses").is_dir() else "stdlib"
    docs, _ = regimes.load_pool(corpus, doc_chars=400, max_bytes=15_000)
    r = regimes.build_regime(docs, "dup", rate=0.5, max_copies=3, seed=0, val_fraction=0.1)
    side = regimes.write_regime(tmp_path / "reg", r, {})
    out = tmp_path / "shards"
    extra = {"val_input": [tmp_path / "reg" / "val.jsonl"]} if val_input else {"val_fraction": 0.2}
    build_shards([tmp_path / "reg" / "train.jsonl"], out, seq_len=32,
                 tokenizer=tiny_shards / "tokenizer.model", samples_per_shard=50, workers=1, progress=False,
                 **extra)
    kinds = regimes.kinds_of_samples(out, side)
    windows = _stream(out)
    assert len(kinds) == len(windows) == Manifest.load(out).num_samples("train")
    # reference: walk the documents that reached train, token by token, against the shards' own tokens
    tok = Tokenizer(tiny_shards / "tokenizer.model")
    from attent_scale.data.builder import split_of
    per_token: list[str] = []
    ids: list[int] = []
    for rec, k in zip(r["train"], r["kind"], strict=True):
        if not val_input and split_of(rec["text"], 0.2) != "train":
            continue
        enc = [*tok.encode(rec["text"]), tok.eos_id]
        ids += enc
        per_token += [k] * len(enc)
    for j, w in enumerate(windows):
        assert w.tolist() == ids[j * 32 : j * 32 + 33]
        targets = per_token[j * 32 + 1 : j * 32 + 33]
        best = max(regimes.KINDS, key=lambda k, t=targets: (t.count(k), -regimes.KINDS.index(k)))
        assert kinds[j] == best
    assert {"copy", "original"} <= set(kinds.tolist())
    with pytest.raises(regimes.RegimeError, match="not built from it|re-tokenizes"):
        regimes.kinds_of_samples(tiny_shards, side)


@pytest.mark.parametrize("val_input", [True, False])
def test_kinds_of_sft_samples(tiny_shards: Path, tmp_path: Path, val_input: bool) -> None:
    from attent_scale.data.samples import decode, read_samples

    recs = [{"prompt": f"What does f{i}() do?" + (" Please say it in detail." * 4 if i % 7 == 0 else ""),
             "response": f"It returns {i} squared plus {i}, always."} for i in range(60)]
    r = regimes.build_regime(recs, "noise", rate=0.2, max_copies=2, seed=1, val_fraction=0.1)
    side = regimes.write_regime(tmp_path / "reg", r, {})
    out = tmp_path / "shards"
    extra = {"val_input": [tmp_path / "reg" / "val.jsonl"]} if val_input else {"val_fraction": 0.2}
    m = build_shards([tmp_path / "reg" / "train.jsonl"], out, seq_len=64, prompt_field="prompt",
                     response_field="response", tokenizer=tiny_shards / "tokenizer.model",
                     samples_per_shard=10, workers=1, progress=False, **extra)
    assert m.raw["build"]["sft"]["skipped"] > 0  # the long prompts leave no response token: not samples
    kinds = regimes.kinds_of_samples(out, side)
    assert len(kinds) == m.num_samples("train") and "swapped" in kinds.tolist()
    # reference: each stored sample's response, decoded, against its record's
    tok = Tokenizer(tiny_shards / "tokenizer.model")
    kind_of = {rec["response"]: k for rec, k in zip(r["train"], r["kind"], strict=True)}  # each one once
    stored = []
    for info in m.shards("train"):
        with open(m.shard_path(info), "rb") as f:
            stored += [decode(raw, np.dtype(m.token_dtype), m.seq_len, m.vocab_size)
                       for raw in read_samples(f)]
    for sample, kind in zip(stored, kinds, strict=True):
        response = tok.decode([t for t, on in zip(sample.tokens, sample.mask, strict=True) if on][:-1])
        assert kind == kind_of[response]


def test_summarize_dropped(tmp_path: Path) -> None:
    kinds = np.array(["original"] * 6 + ["copy"] * 3 + ["noise"])
    sel = tmp_path / "selection.jsonl"
    sel.write_text(json.dumps({"epoch": 1, "step": 10, "dropped_ids": [6, 7, 9, 0]}) + "\n"
                   + json.dumps({"epoch": 2, "step": 20, "selected_ids": list(range(8))}) + "\n")
    buf = io.StringIO()
    rows = regimes.summarize_dropped(sel, kinds, file=buf)
    assert rows[0]["dropped"] == 4 and rows[0]["share"]["copy"] == 0.5 and rows[0]["share"]["noise"] == 0.25
    assert rows[0]["copy_or_noise"] == 0.75
    assert rows[1]["dropped"] == 2 and rows[1]["share"] == {**dict.fromkeys(regimes.KINDS, 0.0), "copy": 0.5,
                                                            "noise": 0.5}
    assert "epoch 1 step 10" in buf.getvalue() and "50.0%" in buf.getvalue()
    np.save(tmp_path / "dropped.npy", np.array([9]))
    assert regimes.summarize_dropped(tmp_path / "dropped.npy", kinds, file=buf)[0]["share"]["noise"] == 1.0
    (tmp_path / "bare.jsonl").write_text(json.dumps({"epoch": 1, "sha256": "00"}) + "\n")
    with pytest.raises(regimes.RegimeError, match="no record with dropped_ids"):
        regimes.summarize_dropped(tmp_path / "bare.jsonl", kinds, file=buf)


def test_cli_bad_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = regimes.main(["--regime", "dup", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "nope" in err


def _bench(finals: dict[str, float], seconds: dict[str, float], to_target: float | None = None) -> dict:
    """A bench.json of one seed with arms uniform, signal (+ its controls) and hard."""
    def arm(name: str, **extra) -> dict:
        seed = {"seed": 0, "final_val_loss": finals[name], "train_seconds": seconds.get(name, 10.0),
                "time_to_target_seconds": to_target if name == "signal" else None}
        return {"name": name, "seeds": [seed], **extra}
    return {"arms": [arm("uniform"), arm("signal", random_control="rnd", uniform_short="short"), arm("rnd"),
                     arm("short"), arm("hard")]}


def test_regime_targets_seed_by_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """tools/ablations/regime_targets.py holds each regime to its own target: dup (time to uniform's final
    within 0.6x and below both controls), noise (below uniform, hard and the random subset), clean (+0.01
    in <= 1.02x the time); a missing regime is skipped."""
    spec = importlib.util.spec_from_file_location(
        "regime_targets", Path(__file__).resolve().parents[2] / "tools" / "ablations" / "regime_targets.py")
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    f = {"uniform": 3.9, "signal": 3.7, "rnd": 3.95, "short": 3.96, "hard": 3.8}
    dup = _bench(f, {"uniform": 20.0}, to_target=11.0)  # 0.55x: held
    assert [ok for _, _, ok in targets.check("dup", dup, "signal", "hard")] == [True]
    assert [ok for _, _, ok in targets.check("dup", _bench(f, {"uniform": 20.0}, to_target=13.0), "signal",
                                             "hard")] == [False]  # 0.65x
    noisy = _bench({**f, "hard": 3.69}, {})  # hard below the signal arm: missed
    assert [ok for _, _, ok in targets.check("noise", noisy, "signal", "hard")] == [False]
    clean = _bench({**f, "signal": 3.909}, {"uniform": 10.0, "signal": 10.1})
    assert [ok for _, _, ok in targets.check("clean", clean, "signal", "hard")] == [True]
    slow = _bench({**f, "signal": 3.909}, {"uniform": 10.0, "signal": 10.3})
    assert [ok for _, _, ok in targets.check("clean", slow, "signal", "hard")] == [False]
    for regime, bench in (("dup", dup), ("clean", slow)):
        (tmp_path / regime).mkdir()
        (tmp_path / regime / "bench.json").write_text(json.dumps(bench))
    assert targets.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("held  dup   seed 0") and "0.55x" in out[0]
    assert out[1].startswith("noise: no ") and out[2].startswith("MISSED  clean seed 0")
    assert out[-1] == "1 of 2 seed targets held"


def _bench29(regime_finals: dict[str, list[float]], seconds: dict[str, float] | None = None,
             **per_arm: dict) -> dict:
    """A bench.json of 3 seeds: per arm its final val per seed; `per_arm[name]` adds keys to every seed."""
    seconds = seconds or {}
    arms = []
    for name, finals in regime_finals.items():
        seeds = [{"seed": s, "final_val_loss": v, "train_seconds": seconds.get(name, 10.0),
                  "reference_seconds": 0.0, **per_arm.get(name, {})} for s, v in enumerate(finals)]
        extra = {"random_control": "rnd", "uniform_short": "short"} if name == "signal" else {}
        arms.append({"name": name, "seeds": seeds, **extra})
    return {"arms": arms}


def test_issue29_targets_seed_by_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """regime_targets.py --issue 29: the oracle gap first, then each regime's own target per seed."""
    spec = importlib.util.spec_from_file_location(
        "regime_targets", Path(__file__).resolve().parents[2] / "tools" / "ablations" / "regime_targets.py")
    targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(targets)
    uni = [3.50, 3.52, 3.48]  # seed spread 0.02: 3x is 0.06
    span = _bench29({"uniform": uni, "signal": [3.43, 3.45, 3.47], "rnd": [3.55] * 3, "short": [3.6] * 3},
                    {"signal": 10.5})
    held = [ok for _, _, ok in targets.check29("span", span, "signal")]
    assert held == [True, True, False]  # seed 2 is only 0.01 below its uniform
    slow = _bench29({"uniform": uni, "signal": [3.40] * 3, "rnd": [3.55] * 3, "short": [3.6] * 3},
                    {"signal": 11.5})  # 1.15x uniform's time
    assert not any(ok for _, _, ok in targets.check29("span", slow, "signal"))
    swapped = _bench29({"uniform": uni, "signal": uni, "rnd": uni, "short": uni},
                       signal={"gap_recovered": 0.7})
    assert all(ok for _, _, ok in targets.check29("swapped", swapped, "signal"))
    constrained = _bench29({"uniform": uni, "signal": uni, "rnd": uni, "short": uni},
                           signal={"speedup_best_charged": 1.2, "uniform_best_val_loss": 3.4})
    assert not any(ok for _, _, ok in targets.check29("constrained", constrained, "signal"))  # 0.83x > 0.8x
    repeats = _bench29({"uniform": uni, "signal": [u + 0.005 for u in uni], "rnd": uni, "short": uni})
    assert all(ok for _, _, ok in targets.check29("repeats", repeats, "signal"))
    repeats["data_case"] = ["signal: The teacher dropped 18% of samples ...: this data has repeats to drop."]
    assert not any(ok for _, _, ok in targets.check29("repeats", repeats, "signal"))
    span["oracle_gap"] = {"final": 0.1, "final_std": 0.01, "final_per_seed": [0.09, 0.1, 0.11],
                          "uniform_spread": 0.02, "ratio": 5.0, "judges": True}
    for regime, bench in (("span", span), ("repeats", repeats)):
        (tmp_path / regime).mkdir()
        (tmp_path / regime / "bench.json").write_text(json.dumps(bench))
    assert targets.main([str(tmp_path), "--issue", "29"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("span        oracle gap +0.1000") and "5.0x" in out[0] and "judges" in out[0]
    assert out[1].startswith("repeats     no oracle")
    assert out[-1] == "2 of 6 seed targets held"
