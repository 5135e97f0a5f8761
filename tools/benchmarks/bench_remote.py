"""Read throughput of one shard set from local disk vs a local S3 server (moto), cold and warm cache.

Usage: python tools/benchmarks/bench_remote.py [--data DIR] [--max-bytes 8000000] [--seq-len 128]
                                               [--batch-size 32] [--repeats 3]
Builds the embedded stdlib corpus (capped; or takes --data, a built shard directory), starts
`moto_server` on a free loopback port (a subprocess: the reader does not share its interpreter), uploads
the set to s3://bench/set, then per repeat streams one epoch of the train split (world size 1, in process)
from disk, from s3 with an empty cache (cold: every shard downloaded and verified) and from s3 again
(warm: every shard from the cache), and before that the shard bytes alone (no decoding). Prints MB/s
(shard bytes over wall seconds) and samples/s per source, as the mean and the min-max spread over the
repeats, and the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from attent_scale.data import Manifest, ShardStream, remote
from attent_scale.data.builder import build_shards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto(port: int, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"moto_server did not start (see {log})")


def epoch(data: str, batch_size: int) -> tuple[float, int]:
    """Seconds and samples of one epoch of the train split, read in this process."""
    t0 = time.perf_counter()
    n = 0
    for batch in ShardStream(data, "train", batch_size=batch_size, num_workers=0, shuffle_buffer=1000):
        n += len(batch["ids"])
    return time.perf_counter() - t0, n


def raw(locs: list[str], m: Manifest) -> float:
    """Seconds to read every train shard's bytes (through the cache for a URL), no decoding."""
    t0 = time.perf_counter()
    for loc, s in zip(locs, m.shards("train"), strict=True):
        with remote.open_shard(loc, s.bytes, s.sha256) as f:
            while f.read(4 << 20):
                pass
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="a built shard directory (default: the embedded corpus)")
    ap.add_argument("--max-bytes", type=int, default=8_000_000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    server = None
    try:
        if args.data:
            local = Path(args.data)
        else:
            local = tmp / "shards"
            build_shards([], local, seq_len=args.seq_len, vocab_size=8000, max_bytes=args.max_bytes,
                         val_fraction=0.01, shard_size_mb=4, progress=False)
        m = Manifest.load(local)
        nbytes = sum(s.bytes for s in m.shards("train"))
        print(f"train split: {m.num_samples('train')} samples, {len(m.shards('train'))} shards, "
              f"{nbytes / 1e6:.1f} MB; batch {args.batch_size}, seq_len {m.seq_len}")
        port = free_port()
        server = start_moto(port, tmp / "moto.log")
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        fs = remote.filesystem("s3://bench")
        fs.mkdir("bench")
        fs.put(str(local) + "/", "bench/set/", recursive=True)
        url = "s3://bench/set"
        results: dict[str, list[tuple[float, int]]] = {"disk": [], "s3 cold": [], "s3 warm": []}
        bytes_only: dict[str, list[float]] = {"disk": [], "s3 cold": [], "s3 warm": []}
        disk_locs = [str(local / s.name) for s in m.shards("train")]
        url_locs = [f"{url}/{s.name}" for s in m.shards("train")]
        for r in range(args.repeats):
            cache = tmp / f"cache{r}"
            remote.configure(remote.Options(cache_dir=str(cache), retries=2, backoff=0.5))
            bytes_only["disk"].append(raw(disk_locs, m))
            bytes_only["s3 cold"].append(raw(url_locs, m))  # download + sha256 into the cache
            bytes_only["s3 warm"].append(raw(url_locs, m))
            shutil.rmtree(cache, ignore_errors=True)
            remote.configure(remote.Options(cache_dir=str(cache), retries=2, backoff=0.5))
            results["disk"].append(epoch(str(local), args.batch_size))
            results["s3 cold"].append(epoch(url, args.batch_size))  # manifest, tokenizer, every shard
            results["s3 warm"].append(epoch(url, args.batch_size))
            shutil.rmtree(cache, ignore_errors=True)
        load = os.getloadavg()[0]
        for name, secs in bytes_only.items():
            mbs = [nbytes / 1e6 / s for s in secs]
            print(f"bytes {name:8s}: {sum(mbs) / len(mbs):8.1f} MB/s (min {min(mbs):.1f}, max {max(mbs):.1f})"
                  "  shard bytes only, no decoding")
        for name, runs in results.items():
            mbs = [nbytes / 1e6 / s for s, _ in runs]
            sps = [n / s for s, n in runs]
            print(f"epoch {name:8s}: {sum(mbs) / len(mbs):8.1f} MB/s (min {min(mbs):.1f}, "
                  f"max {max(mbs):.1f})  "
                  f"{sum(sps) / len(sps):9.0f} samples/s (min {min(sps):.0f}, max {max(sps):.0f})  "
                  f"over {len(runs)} epochs")
        print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} cores")
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
