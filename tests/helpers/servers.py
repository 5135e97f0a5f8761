"""Real servers for ops tests: a single-node Slurm (munge, slurmctld, slurmd) and a loopback Prometheus."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SLURM_BINARIES = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol",
                  "squeue", "srun")


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """First port of the kernel's range for outgoing connections (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _can_bind(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port(span: int = 4) -> int:
    """A TCP port, with the `span - 1` after it (exporters listen on port + LOCAL_RANK), free on every
    address a moment ago. Drawn below the kernel's ephemeral range: a port the kernel hands out (bind to
    port 0) can be taken meanwhile by any outgoing connection — gloo opens many — and a job then fails
    with "port already in use"."""
    low = _ephemeral_low()
    low = low if 10000 + 100 < low <= 32768 else 32768
    for _ in range(500):
        port = random.randrange(10000, low - span)
        if not _HANDED_OUT.intersection(range(port, port + span)) and all(
                _can_bind(p) for p in range(port, port + span)):
            _HANDED_OUT.update(range(port, port + span))
            return port
    raise RuntimeError(f"no {span} free consecutive TCP ports in 10000-{low}")


def require(binaries: tuple[str, ...], package: str) -> None:
    """FAIL (never skip) when a server binary is missing: the tests must run for real."""
    missing = [b for b in binaries if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: install the Debian package(s) {package} "
                    "(.ci/run does: apt-get install slurm-wlm munge prometheus shellcheck)", pytrace=False)


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop a daemon we started, by its pid: TERM, then KILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait(pred: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}", pytrace=False)


# ----------------------------------------------------------------------------- Slurm
# cred_expire: a requeued job becomes eligible again only after the step credentials expire (default 120 s).
@dataclass
class Slurm:
    """A running single-node cluster; run client commands with ``env`` (it carries SLURM_CONF)."""

    dir: Path
    conf: Path
    node: str
    partition: str
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout)

    def sbatch(self, *args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise AssertionError(f"sbatch failed: {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: int, timeout: float, states: tuple[str, ...] = ("COMPLETED", "FAILED",
                 "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job(job_id).get("JobState", "")
            if state in states:
                return state
            time.sleep(0.5)
        self.run("scancel", str(job_id), check=False)
        raise AssertionError(f"job {job_id} still {state} after {timeout:.0f}s: {self.job(job_id)}")


def _munge_ok() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _start_munge(procs: list[subprocess.Popen], log: Path) -> None:
    if _munge_ok():
        return  # a munged is already running (CI or another test session): share it
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    procs.append(subprocess.Popen([_binary("munged"), "--foreground", "--force"], user="munge",
                                  group="munge", extra_groups=[], stdout=log.open("w"),
                                  stderr=subprocess.STDOUT, start_new_session=True))
    _wait(_munge_ok, 30, "munged to answer", log)


SLURM_CONF = """\
ClusterName=attenttest
SlurmctldHost={ctld_host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
ReturnToService=2
KillWait=30
MinJobAge=600
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
{nodes}
PartitionName={partition} Nodes={node_names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@contextmanager
def slurm_cluster(partition: str = "debug") -> Iterator[Slurm]:
    """Bring up munge + slurmctld + slurmd (as root) in a temp dir; stop what we started, by pid."""
    require(SLURM_BINARIES, "slurm-wlm and munge")
    if os.geteuid() != 0:
        pytest.fail("the Slurm test cluster needs root (slurmd runs jobs as their user)", pytrace=False)
    tmp = Path(tempfile.mkdtemp(prefix="attent-slurm-"))
    node = socket.gethostname()
    for d in ("state", f"spool-{node}"):
        (tmp / d).mkdir()
    conf = tmp / "slurm.conf"
    conf.write_text(SLURM_CONF.format(ctld_host=node, nodes=f"NodeName={node} CPUs={os.cpu_count() or 1} "
                                      "State=UNKNOWN", node_names=node, dir=tmp, partition=partition,
                                      ctld_port=free_port(), slurmd_port=free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []
    cluster = Slurm(dir=tmp, conf=conf, node=node, partition=partition, env=env, procs=procs)
    try:
        _start_munge(procs, tmp / "munged.log")
        procs.append(subprocess.Popen([_binary("slurmctld"), "-D", "-i", "-f", str(conf)], env=env,
                                      stdout=(tmp / "slurmctld.out").open("w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        _wait(lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0, 60,
              "slurmctld", tmp / "slurmctld.log")
        procs.append(subprocess.Popen([_binary("slurmd"), "-D", "-f", str(conf)], env=env,
                                      stdout=(tmp / "slurmd.out").open("w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))

        def idle() -> bool:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
            return bool(out) and all(s.rstrip("*") in ("idle", "mix", "alloc") for s in out)

        _wait(idle, 60, "the node to be idle in sinfo", tmp / f"slurmd-{node}.log")
        yield cluster
    finally:
        subprocess.run(["scancel", "--full", "--quiet", f"--partition={partition}"], env=env,
                       capture_output=True, timeout=30, check=False)
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- Prometheus
@dataclass
class Prometheus:
    """A loopback Prometheus (scrape_interval 1s) reading file_sd targets from ``targets_dir``."""

    url: str
    targets_dir: Path
    proc: subprocess.Popen

    def add_targets(self, name: str, targets: list[str], labels: dict[str, str] | None = None) -> None:
        """Write a file_sd target file (atomically) for Prometheus to pick up."""
        tmp = self.targets_dir / f".{name}.tmp"
        tmp.write_text(json.dumps([{"targets": targets, "labels": labels or {}}]))
        os.replace(tmp, self.targets_dir / f"{name}.json")

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query via /api/v1/query; raises AssertionError on any API error."""
        params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"query {promql!r} failed: {exc.read().decode()}") from None
        if body.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed: {body}")
        return body["data"]["result"]

    def wait_for(self, promql: str, pred: Callable[[list[dict[str, Any]]], bool], timeout: float = 30
                 ) -> list[dict[str, Any]]:
        """Poll ``promql`` until ``pred(result)`` holds."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if pred(result):
                return result
            time.sleep(0.5)
        raise AssertionError(f"{promql!r} never satisfied the condition in {timeout:.0f}s: {result}")


def prometheus_yml(targets: Path) -> str:
    """The shipped prometheus.yml (its scrape job, labels and honor_labels as users get them), scraping
    every second from `targets`."""
    import yaml

    from attent_scale import assets

    conf = yaml.safe_load(assets.path("ops", "prometheus", "prometheus.yml").read_text())
    conf["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    (job,) = conf["scrape_configs"]
    job["file_sd_configs"] = [{"files": [f"{targets}/*.json"], "refresh_interval": "1s"}]
    return yaml.safe_dump(conf)


@contextmanager
def prometheus_server() -> Iterator[Prometheus]:
    """Start Prometheus on a free loopback port with a temp TSDB; stop it by pid."""
    require(("prometheus",), "prometheus")
    tmp = Path(tempfile.mkdtemp(prefix="attent-prom-"))
    (tmp / "targets").mkdir()
    (tmp / "prometheus.yml").write_text(prometheus_yml(tmp / "targets"))
    port = free_port()
    log = tmp / "prometheus.log"
    proc = subprocess.Popen(
        [_binary("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited with {proc.returncode}: {log.read_text()[-2000:]}", pytrace=False)
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        _wait(ready, 60, "prometheus /-/ready", log)
        yield Prometheus(url=url, targets_dir=tmp / "targets", proc=proc)
    finally:
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- object storage


@dataclass
class S3Server:
    """moto's S3 HTTP API (its server mode: werkzeug in a thread of this process) on loopback. `stop`
    closes the listening socket (clients get connection refused); `start` again serves the same buckets,
    as a restarted store keeps its objects (moto keeps them in this process). Clients reach it through
    `env`: AWS_ENDPOINT_URL and dummy keys, the way a job reaches any S3 endpoint."""

    port: int
    server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> None:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            pytest.fail("moto's server mode is not installed: pip install 'moto[server]' (the dev extra)",
                        pytrace=False)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server._server.server_close()  # stop() leaves the socket listening: close it
            self.server = None

    def upload(self, src: Path, url: str) -> str:
        """Copy the local directory `src` to `url` (s3://bucket/prefix, the bucket made if needed)."""
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=self.endpoint, key="testing",
                               secret="testing")
        bucket = url.split("/")[2]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        fs.put(str(src).rstrip("/") + "/", url.rstrip("/") + "/", recursive=True)
        return url


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on a free loopback port for the duration; stopped at the end."""
    server = S3Server(port=free_port(1))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def http_server(root: Path, log_dir: Path) -> Iterator[str]:
    """Python's http.server serving `root` on loopback; yields its base URL."""
    port = free_port(1)
    log = log_dir / "http.log"
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(root)], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    try:
        _wait(up, 30, f"http.server on port {port}", log)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)
