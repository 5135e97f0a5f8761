"""attent_scale.launcher: the one torchrun / plain-process command line every launch uses."""

from __future__ import annotations

import sys

from attent_scale import launcher


def test_one_process_is_this_interpreter_and_more_is_standalone_torchrun() -> None:
    assert launcher.command() == [sys.executable, "-m", "attent_scale", "train"]
    assert launcher.command(("x.py", "a"), 3) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "x.py", "a"]
    assert launcher.command((), 2, rendezvous=("--master_port=1234",))[3:] == [
        "--master_port=1234", "--nproc-per-node=2"]


def test_a_given_launcher_is_split_like_a_shell_and_wins_over_nproc() -> None:
    assert launcher.command(nproc=4, launcher="torchrun --nproc-per-node 2") == [
        "torchrun", "--nproc-per-node", "2", "-m", "attent_scale", "train"]
    assert launcher.command(("s.py",), launcher=["deepspeed"]) == ["deepspeed", "s.py"]


def test_one_rank_through_torchrun_on_request() -> None:
    assert launcher.command(("x.py",), 1, torchrun=True) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "x.py"]
