"""Process-group setup from the torchrun / deepspeed launcher / srun environment; the run's collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from attent_scale.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; `backend` is None for a single process."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device


_joined_group = False  # this process called init_process_group through us (see `joined_group`)


def joined_group() -> bool:
    """True once this process has joined a process group here (even after it was destroyed)."""
    return _joined_group


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def ensure_accelerator_env() -> None:
    """Point DeepSpeed at the CPU accelerator when there is no CUDA (must run before `import deepspeed`)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_deepspeed_comm(verbose: bool = True) -> None:
    """deepspeed.comm over the torch process group already joined, without DeepSpeed's CPU shared-memory
    all-reduce op.

    On the CPU accelerator DeepSpeed JIT-builds that op (deepspeed_shm_comm) in every process at init,
    under torch's lock file in ~/.cache/torch_extensions; a process killed while it holds the lock (a
    preempted or cancelled job, a timed-out rank) leaves the file behind, and every later DeepSpeed start
    on the machine waits on it forever. Only `inference_all_reduce` uses the op, never training, so the
    op is marked incompatible (the dict DeepSpeed consults and keeps per process) before init."""
    import deepspeed

    if deepspeed.accelerator.get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=verbose)


def _ipv4_ifaces() -> dict[str, str]:
    """{interface: IPv4 address} of this host's interfaces that have one (SIOCGIFADDR)."""
    import fcntl
    import socket
    import struct

    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
            out[name] = socket.inet_ntoa(raw[20:24])
    return out


def _iface_with_ip(ip: str) -> str | None:
    return next((name for name, addr in _ipv4_ifaces().items() if addr == ip), None)


def _default_route_iface() -> str | None:
    """The default route's interface, else the first interface with a non-loopback IPv4 address."""
    from pathlib import Path

    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) > 1 and fields[1] == "00000000":
            return fields[0]
    return next((name for name, addr in _ipv4_ifaces().items() if not addr.startswith("127.")), None)


def route_iface(master_addr: str) -> str | None:
    """The interface this host reaches `master_addr` through (never loopback), or None if unknown.

    When the master's name resolves to a loopback address here (a Debian hosts file maps the own
    hostname to 127.0.1.1), other hosts cannot use it: take the default route's interface instead.
    """
    import socket

    try:
        ip = socket.gethostbyname(master_addr)
        if not ip.startswith("127."):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((ip, 9))  # UDP connect sends nothing: it only picks the route and source address
                name = _iface_with_ip(s.getsockname()[0])
            if name and name != "lo":
                return name
    except OSError:
        pass
    return _default_route_iface()


def local_world_size(default: int) -> int:
    """Processes on this host: torchrun's LOCAL_WORLD_SIZE, else the deepspeed launcher's LOCAL_SIZE."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name):
            return _env_int(name, default)
    return default


def spans_hosts() -> bool:
    """True when this job runs on more than one host.

    Either the launcher says so (WORLD_SIZE above this host's LOCAL_WORLD_SIZE / LOCAL_SIZE) or Slurm
    does (SLURM_JOB_NUM_NODES / SLURM_NNODES above 1), so a launcher that sets neither local size still
    counts as multi-host inside a multi-node allocation.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world > local_world_size(world):
        return True
    nodes = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or "1"
    return world > 1 and nodes.isdigit() and int(nodes) > 1


def set_socket_ifname() -> str | None:
    """Choose the network interface gloo (and NCCL's bootstrap) use on a multi-host job; returns gloo's.

    ATTENT_SOCKET_IFNAME sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME; values already in the environment
    win. Otherwise, on a job spanning hosts, GLOO_SOCKET_IFNAME is the interface of the route to
    MASTER_ADDR: gloo would otherwise advertise the address of its hostname, 127.0.1.1 on Debian-style
    hosts files, which other hosts cannot reach. NCCL finds a usable interface itself.
    """
    knob = os.environ.get("ATTENT_SOCKET_IFNAME")
    if knob:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", knob)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", knob)
    if "GLOO_SOCKET_IFNAME" not in os.environ and spans_hosts():
        name = route_iface(os.environ.get("MASTER_ADDR", "127.0.0.1"))
        if name:
            os.environ["GLOO_SOCKET_IFNAME"] = name
    return os.environ.get("GLOO_SOCKET_IFNAME")


def cluster_address() -> str | None:
    """This host's IPv4 address on the interface the job's sockets use, or None if there is none.

    The interface is GLOO_SOCKET_IFNAME's first entry (chosen by `set_socket_ifname` on a multi-host job,
    or by the user), else ATTENT_SOCKET_IFNAME, else the interface of the route to MASTER_ADDR: the
    network the other hosts, and a Prometheus scraping node names, reach this host on.
    """
    named = os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("ATTENT_SOCKET_IFNAME") or ""
    name = named.split(",")[0].strip() or route_iface(os.environ.get("MASTER_ADDR") or "127.0.0.1")
    return _ipv4_ifaces().get(name) if name else None


def choose_cuda_device(local_rank: int, local_world_size: int, device_count: int) -> int:
    """Index of this rank's CUDA device among the visible ones (one device per local rank).

    `device_count` is what CUDA enumerates for this process, so CUDA_VISIBLE_DEVICES and MIG instances
    (each MIG instance is one device) are already respected. More local ranks than devices is an error,
    never a silent modulo that would put two ranks on one device.
    """
    if device_count < 1:
        raise UserError("no CUDA device visible to this process (check CUDA_VISIBLE_DEVICES)")
    if local_world_size > device_count or not 0 <= local_rank < device_count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise UserError(
            f"LOCAL_RANK {local_rank} of LOCAL_WORLD_SIZE {local_world_size}: only {device_count} CUDA "
            f"device(s) visible (CUDA_VISIBLE_DEVICES={visible}); launch at most one rank per device"
        )
    return local_rank


def initialized() -> bool:
    """True when a process group is up in this process."""
    return dist.is_available() and dist.is_initialized()


def group_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in `group` (None: the default group); 1 when no process group is up."""
    return dist.get_world_size(group) if initialized() else 1


def side_group() -> dist.ProcessGroup | None:
    """Collective (every rank calls it): a gloo group of all ranks for the CPU tensors of the teacher and
    the run's bookkeeping on an NCCL job; None (use the default group, gloo already, or none) otherwise."""
    if initialized() and dist.get_backend() == "nccl":
        return dist.new_group(backend="gloo")
    return None


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor for a collective on `group` must live: the current CUDA device on NCCL, else CPU."""
    if initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT.

    A task srun started without torchrun gets them from its SLURM_* variables first (attent_scale/srun.py).
    nccl on CUDA, gloo on CPU. A single process (WORLD_SIZE unset or 1) initialises nothing.
    Calling it again after the group exists returns the same info.
    """
    import datetime

    from attent_scale import srun

    ensure_accelerator_env()
    srun.apply()
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = local_world_size(max(1, min(world_size, local_rank + 1)))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(choose_cuda_device(local_rank, local_world, torch.cuda.device_count()))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), device)
    if world_size <= 1:
        return DistInfo(0, 1, 0, None, device)
    backend = "nccl" if cuda else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but no MASTER_PORT (launch with torchrun, srun or deepspeed)")
    set_socket_ifname()
    kwargs: dict = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if cuda:
        kwargs["device_id"] = device
    global _joined_group
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    _joined_group = True
    return DistInfo(rank, world_size, local_rank, backend, device)


def init_one_rank_group(device: torch.device) -> None:
    """A one-rank process group for a single process (sharded engines need one: people debug that way)."""
    if initialized():
        return
    import socket

    # what a launcher would set: DeepSpeed's zero.Init reads LOCAL_RANK from the environment
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        if not os.environ.get(name):
            os.environ[name] = value
    if not os.environ.get("MASTER_ADDR"):
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    if not os.environ.get("MASTER_PORT"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
    global _joined_group
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1, **kwargs)
    _joined_group = True


def is_distributed() -> bool:
    """True when a process group with more than one rank is up."""
    return group_size() > 1


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank; a no-op for a single process."""
    if is_distributed():
        dist.barrier(group=group)


def all_reduce_flag(flag: bool, op: str = "max", group: dist.ProcessGroup | None = None) -> bool:
    """Combine a per-rank bool across ranks: op 'max' = any rank true, 'min' = all ranks true.

    Use it at step boundaries so every rank takes the same stop/save decision (lockstep).
    """
    if op not in ("max", "min"):
        raise ValueError(f"all_reduce_flag: op must be 'max' or 'min', got {op!r}")
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def all_reduce_values(values: list[int] | list[float], op: str = "sum",
                      group: dist.ProcessGroup | None = None) -> list:
    """Element-wise sum, max or min of a few numbers over the ranks of `group`, in one collective (the
    values as given on one process); ints stay exact (int64), floats go as float64."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"all_reduce_values: op must be one of {sorted(ops)}, got {op!r}")
    if group_size(group) <= 1:
        return list(values)
    ints = all(isinstance(v, int) for v in values)
    t = torch.tensor(values, dtype=torch.int64 if ints else torch.float64, device=collective_device(group))
    dist.all_reduce(t, op=ops[op], group=group)
    return [int(v) for v in t.tolist()] if ints else t.tolist()


def all_gather_objects(item: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's picklable `item`, in rank order ([item] on one process). It pickles and runs two
    collectives: for start-up checks and end-of-run totals, never a hot path."""
    world = group_size(group)
    if world <= 1:
        return [item]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, item, group=group)
    return out


def destroy() -> None:
    """Tear the process group down if one is up."""
    if initialized():
        dist.destroy_process_group()
