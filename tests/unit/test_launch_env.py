"""Launch environment: the network interface gloo uses across hosts, and the deepspeed runner's argv."""

from __future__ import annotations

import socket

import pytest

from attent_scale import dist as adist
from attent_scale.cli import build_parser


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "ATTENT_SOCKET_IFNAME", "WORLD_SIZE",
                 "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        # setenv first so that undo also removes what the code under test sets (a bare delenv of an
        # absent name records nothing, and GLOO_SOCKET_IFNAME would leak into every later gloo test)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_route_iface_is_never_loopback() -> None:
    assert adist.route_iface("127.0.0.1") != "lo"
    assert adist.route_iface(socket.gethostname()) != "lo"


def test_master_name_resolving_to_127_0_1_1_falls_back_to_a_routable_interface(clean_env) -> None:
    real = socket.gethostbyname
    clean_env.setattr(socket, "gethostbyname", lambda name: "127.0.1.1" if name == "head" else real(name))
    clean_env.setattr(adist, "_default_route_iface", lambda: "eth7")
    assert adist.route_iface("head") == "eth7"


def test_socket_ifname_only_on_jobs_spanning_hosts(clean_env) -> None:
    clean_env.setattr(adist, "route_iface", lambda addr: f"if-{addr}")
    clean_env.setenv("MASTER_ADDR", "head")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_WORLD_SIZE", "4")  # one host: gloo's own choice works
    assert adist.set_socket_ifname() is None
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")  # two hosts
    assert adist.set_socket_ifname() == "if-head"
    clean_env.setenv("GLOO_SOCKET_IFNAME", "mine")  # the user's setting wins
    assert adist.set_socket_ifname() == "mine"


def test_socket_ifname_on_the_deepspeed_launchers_local_size(clean_env) -> None:
    # the deepspeed launcher sets LOCAL_SIZE, not LOCAL_WORLD_SIZE: 2 hosts x 2 processes
    clean_env.setattr(adist, "route_iface", lambda addr: f"if-{addr}")
    clean_env.setenv("MASTER_ADDR", "head")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_SIZE", "2")
    assert adist.spans_hosts()
    assert adist.set_socket_ifname() == "if-head"
    clean_env.delenv("GLOO_SOCKET_IFNAME")
    clean_env.setenv("LOCAL_SIZE", "4")  # one host
    assert adist.set_socket_ifname() is None


def test_socket_ifname_on_a_multi_node_slurm_job_without_a_local_size(clean_env) -> None:
    clean_env.setattr(adist, "route_iface", lambda addr: f"if-{addr}")
    clean_env.setenv("MASTER_ADDR", "head")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("SLURM_JOB_NUM_NODES", "1")
    assert adist.set_socket_ifname() is None
    clean_env.setenv("SLURM_JOB_NUM_NODES", "2")
    assert adist.set_socket_ifname() == "if-head"


def test_socket_ifname_knob_sets_gloo_and_nccl(clean_env) -> None:
    import os

    clean_env.setenv("ATTENT_SOCKET_IFNAME", "ib0")
    assert adist.set_socket_ifname() == "ib0"
    assert os.environ["NCCL_SOCKET_IFNAME"] == "ib0"


def test_train_accepts_the_deepspeed_runners_local_rank() -> None:
    for extra in (["--local_rank=3"], ["--local-rank", "1"]):
        args = build_parser().parse_args(["train", "--config", "x.yaml", *extra])
        assert args.command == "train"
