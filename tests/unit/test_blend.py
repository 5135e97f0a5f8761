"""Blends (data/blend.py) and per-source selection (teacher/floors.py) in one process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from attent_scale.config import TeacherConfig, config_from_dict
from attent_scale.data import Manifest, ShardStream
from attent_scale.data.blend import blend_counts, blend_layout_changes, open_blend, open_data
from attent_scale.errors import UserError
from attent_scale.teacher import Teacher
from attent_scale.teacher.floors import SourceRange
from attent_scale.teacher.records import read_records


def src(d: Path, **kw: object) -> SimpleNamespace:
    return SimpleNamespace(**{"dir": str(d), "name": "", "weight": None, "samples": None, "floor": 0.0, **kw})


def read_all(data: object, split: str, **kw: object) -> dict[int, tuple[int, ...]]:
    """id -> input tokens of every sample `data` yields on one rank (each id once)."""
    out: dict[int, tuple[int, ...]] = {}
    for batch in ShardStream(data, split, batch_size=64, shuffle_buffer=0, **kw):
        for i, row in zip(batch["ids"].tolist(), batch["input_ids"].tolist(), strict=True):
            assert i not in out
            out[i] = tuple(row)
    return out


def test_blend_counts_follow_samples_and_weights() -> None:
    assert blend_counts([100, 50], weights=[None, None], samples=[None, None]) == [100, 50]
    assert blend_counts([100, 50], weights=[None, None], samples=[230, None]) == [230, 50]
    assert blend_counts([100, 50], weights=[3.0, 1.0], samples=[None, None]) == [113, 37]  # of 150
    assert blend_counts([100, 50], weights=[3.0, 1.0], samples=[None, None], total=200) == [150, 50]
    assert blend_counts([10, 10, 10], weights=[1.0, 1.0, 1.0], samples=[None] * 3, total=10) == [4, 3, 3]


def test_blend_ids_are_dense_and_map_to_their_source_samples(blend_shards: tuple[Path, Path]) -> None:
    a, b = blend_shards
    ma, mb = Manifest.load(a), Manifest.load(b)
    na, nb = ma.num_samples("train"), mb.num_samples("train")
    # a: one whole copy plus 30 drawn once more; b: 40 of its samples drawn
    blend = open_blend([src(a, name="code", samples=na + 30), src(b, name="prose", samples=40)],
                       weighted_split="train", total=0, seed=7)
    assert blend.num_samples("train") == na + 30 + 40
    assert blend.source_ranges("train") == [("code", 0, na + 30), ("prose", na + 30, na + 70)]
    got = read_all(blend, "train")
    assert sorted(got) == list(range(na + 70))  # dense, every id once
    own_a, own_b = read_all(ma, "train"), read_all(mb, "train")
    assert all(got[i] == own_a[i] for i in range(na))  # the first copy is the source itself
    extra = [got[i] for i in range(na, na + 30)]
    assert len(set(extra)) == 30 and set(extra) <= set(own_a.values())  # drawn without replacement
    drawn = [got[i] for i in range(na + 30, na + 70)]
    assert len(set(drawn)) == 40 and set(drawn) <= set(own_b.values())
    # stratified: every shard of b gives its share of the 40 (largest remainder)
    per_shard = [sum(p.count for p in blend.parts("train") if p.source == 1 and p.local_first == s.first_id)
                 for s in mb.shards("train")]
    exact = [40 * s.count / nb for s in mb.shards("train")]
    assert sum(per_shard) == 40 and all(abs(k - x) < 1 for k, x in zip(per_shard, exact, strict=True))
    src_of = blend.source_of(np.array([0, na + 29, na + 30, na + 69]), "train")
    assert src_of.tolist() == [0, 0, 1, 1]
    # the same layout from the same settings; another seed draws other samples
    again = open_blend([src(a, name="code", samples=na + 30), src(b, name="prose", samples=40)],
                       weighted_split="train", total=0, seed=7)
    assert again.fingerprint("train") == blend.fingerprint("train")
    other = open_blend([src(a, name="code", samples=na + 30), src(b, name="prose", samples=40)],
                       weighted_split="train", total=0, seed=8)
    assert other.fingerprint("train") != blend.fingerprint("train")
    # val: both sources' val splits in full, unweighted
    val = read_all(blend, "val")
    assert len(val) == ma.num_samples("val") + mb.num_samples("val")
    # two ranks: disjoint blocks of the same epoch sequence
    r0, r1 = (read_all(blend, "train", rank=r, world_size=2, seed=3) for r in range(2))
    assert not set(r0) & set(r1) and len(r0) == len(r1) == (na + 70) // 2


def test_weighted_blend_and_config(blend_shards: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = blend_shards
    cfg = config_from_dict({"data": {"sources": [{"dir": str(a), "weight": 3}, {"dir": str(b), "weight": 1,
                                                                                 "floor": 0.2}],
                                     "blend_samples": 200}})
    assert cfg.data.sources[1].floor == 0.2 and cfg.data.sources[0].weight == 3.0
    blend = open_data(cfg.data, seed=0)
    assert blend.counts("train") == [150, 50]
    assert [n for n, _, _ in blend.source_ranges("train")] == [a.name, b.name]
    bad = [
        ({"sources": [{"dir": str(a), "weight": 1}, {"dir": str(b)}]}, "data.sources[1].weight"),
        ({"sources": [{"dir": str(a), "weight": 1, "samples": 5}]}, "data.sources[0]': give weight or"),
        ({"sources": [{"dir": str(a)}, {"dir": str(a)}]}, "names two sources"),
        ({"sources": [{"dir": str(a), "floor": 1.5}]}, "data.sources[0].floor"),
        ({"sources": [{"dir": str(a)}], "dir": str(a)}, "give one"),
        ({"sources": [{"dir": str(a), "nme": "x"}]}, "unknown config key 'data.sources[0].nme'"),
    ]
    for data, words in bad:
        with pytest.raises(UserError, match=None) as err:
            open_data(config_from_dict({"data": data}).data, seed=0)
        assert words in str(err.value) and "\n" not in str(err.value), (words, err.value)
    # manifests that disagree on what a sample means: one line naming the source and the key
    for key, value in (("seq_len", 16), ("tokenizer", "other")):
        c = tmp_path / f"bad-{key}"
        shutil.copytree(b, c)
        m = json.loads((c / "manifest.json").read_text())
        if key == "tokenizer":
            m["tokenizer"]["sha256"] = "0" * 64
        else:
            m[key] = value
        (c / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(UserError) as err:
            open_blend([src(a), src(c, name="bad")], weighted_split="train", total=0, seed=0)
        want = "tokenizer_sha256" if key == "tokenizer" else key
        assert f"data.sources[1] (bad, {c / 'manifest.json'}): {want} " in str(err.value), err.value


def test_floor_tops_up_a_starved_source_with_its_best_unselected_ids(tmp_path: Path) -> None:
    cfg = TeacherConfig(mode="ledger", strategy="hard", ratio_schedule="constant", initial_ratio=0.3,
                        warmup_epochs=0)
    sources = [SourceRange("a", 0, 60, floor=0.5), SourceRange("b", 60, 100)]
    t = Teacher(cfg, num_samples=100, seed=0, record_path=tmp_path / "selection.jsonl", sources=sources)
    ids = np.arange(100, dtype=np.int64)
    loss = np.where(ids >= 60, 10.0 + ids, ids).astype(np.float32)  # b's losses above all of a's
    loss[59] = np.nan  # a non-finite loss: never chosen, also not by the floor
    t.observe(torch.from_numpy(ids), torch.from_numpy(loss), step=1)
    sel = t.select(0, step=1)
    # top-k: round(0.3 * 99 finite) = 30 ids, all of b's highest; a needs round(0.5 * 60) = 30: its 30
    # highest finite losses (ids 29..58)
    assert sorted(sel.ids().tolist()) == list(range(29, 59)) + list(range(70, 100))
    rec = read_records(tmp_path / "selection.jsonl")[-1]
    assert rec["n_selected"] == 60 and rec["k"] == 30
    a, b = rec["sources"]
    assert a == {"name": "a", "samples": 60, "selected": 30, "dropped": 30, "floor": 0.5, "floor_added": 30,
                 "mean_loss": pytest.approx(29.0), "mean_loss_selected": pytest.approx(43.5)}
    assert b["selected"] == 30 and b["floor_added"] == 0 and b["dropped"] == 10
    assert b["mean_loss"] == pytest.approx(89.5) and b["mean_loss_selected"] == pytest.approx(94.5)
    assert sum(s["selected"] for s in rec["sources"]) == rec["n_selected"]
    assert t.planned_count(t.plan_epoch(0), 100) == 60  # the plan counts the top-ups
    # a floor the top-k already meets adds nothing
    t2 = Teacher(cfg, num_samples=100, seed=0, sources=[SourceRange("a", 0, 60), SourceRange("b", 60, 100,
                                                                                              floor=0.1)])
    t2.observe(torch.from_numpy(ids), torch.from_numpy(loss), step=1)
    assert t2.select(0, step=1).count == 30 and t2.last_record["sources"][1]["floor_added"] == 0


def test_per_source_gauges_carry_a_source_label() -> None:
    from test_metrics import scrape, value

    from attent_scale.config import MetricsConfig
    from attent_scale.metrics import Metrics

    with Metrics.create(MetricsConfig(enabled=True, port=0), rank=0, local_rank=0, node="n") as m:
        m.observe_sources([{"name": "code", "samples": 200, "selected": 50, "dropped": 150, "floor_added": 0,
                            "mean_loss": 2.5},
                           {"name": "prose", "samples": 100, "selected": 30, "dropped": 70, "floor_added": 12,
                            "mean_loss": None}])
        got = scrape(m.port)  # type: ignore[arg-type]
    assert value(got, "attent_source_selected_samples", source="code") == 50
    assert value(got, "attent_source_floor_added_samples", source="prose") == 12
    assert value(got, "attent_source_mean_loss_nats", source="code") == 2.5
    assert not [k for k in got if k[0] == "attent_source_mean_loss_nats" and ("source", "prose") in k[1]]


def test_a_resume_refuses_another_blend_layout_but_not_moved_dirs() -> None:
    def cfg(*sources: dict) -> dict:
        return {"data": {"sources": [{"dir": "x", "name": "", "weight": None, "samples": None, "floor": 0.0,
                                      **s} for s in sources]}}

    old = cfg({"name": "a", "weight": 2.0}, {"name": "b", "weight": 1.0})
    assert blend_layout_changes(old, cfg({"name": "a", "weight": 2.0, "dir": "moved"},
                                         {"name": "b", "weight": 1.0, "floor": 0.2})) == []
    for new in (cfg({"name": "a", "weight": 3.0}, {"name": "b", "weight": 1.0}),
                cfg({"name": "b", "weight": 1.0}, {"name": "a", "weight": 2.0}),
                cfg({"name": "a", "weight": 2.0})):
        assert blend_layout_changes(old, new)
    assert blend_layout_changes({"data": {"dir": "d"}}, {"data": {"dir": "d", "sources": []}}) == []
