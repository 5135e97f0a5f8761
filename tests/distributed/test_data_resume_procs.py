"""ShardStream resume across real processes: 1 and 2 ranks, 0 and 2 workers, save in one process, resume in
another, and the concatenation equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import procs

from attent_scale.data.builder import build_shards

RANK_SCRIPT = r'''
import json, sys
from attent_scale.data import ShardStream

mode, shards, rank, world, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
K = 5  # odd: with 2 workers the restored cycle must start at the second worker

def ids(stream, limit=None):
    out = []
    for batch in stream:
        out.append(batch["ids"].tolist())
        if len(out) == limit:
            break
    return out

result = {} if mode == "save" else json.load(open(path))
for nw in (0, 2):
    kw = dict(rank=rank, world_size=world, seed=11, epoch=1, batch_size=3, shuffle_buffer=9, num_workers=nw)
    r = result.setdefault(str(nw), {})
    if mode == "save":
        r["full"] = ids(ShardStream(shards, "train", **kw))
        s = ShardStream(shards, "train", **kw)
        r["head"] = ids(s, limit=K)
        r["state"] = json.loads(json.dumps(s.state_dict()))
    else:
        s = ShardStream(shards, "train", **kw)
        s.load_state_dict(r["state"])
        r["tail"] = ids(s)
        r["samples"] = s.samples_consumed
json.dump(result, open(path, "w"))
'''


def _launch(mode: str, script: Path, shards: Path, jobs: list[tuple[int, int]], tmp: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    started = [  # procs.start: a failed or timed-out test kills them all at its teardown
        procs.start(
            [sys.executable, str(script), mode, str(shards), str(r), str(w), str(tmp / f"{w}-{r}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for w, r in jobs
    ]
    for p in started:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out


def test_resume_in_fresh_processes(tmp_path: Path) -> None:
    rng = random.Random(5)
    src = tmp_path / "src"
    src.mkdir()
    words = ["abc", "de", "fgh", "ij", "klm", "no"]
    for i in range(30):
        (src / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(80)))
    shards = tmp_path / "shards"
    build_shards([src], shards, seq_len=10, vocab_size=280, samples_per_shard=11, val_fraction=0.0,
                 progress=False)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    jobs = [(1, 0), (2, 0), (2, 1)]  # (world, rank): one process per rank, the ranks of a world concurrently
    _launch("save", script, shards, jobs, tmp_path)
    _launch("resume", script, shards, jobs, tmp_path)
    for world in (1, 2):
        for nw in ("0", "2"):
            per_rank = []
            for rank in range(world):
                r = json.loads((tmp_path / f"{world}-{rank}.json").read_text())[nw]
                assert len(r["head"]) == 5 and r["tail"]
                assert r["head"] + r["tail"] == r["full"], (world, nw, rank)
                assert r["samples"] == sum(len(b) for b in r["full"])
                per_rank.append([i for b in r["full"] for i in b])
            assert len({len(ids) for ids in per_rank}) == 1
            union = [i for ids in per_rank for i in ids]
            assert len(union) == len(set(union))
