"""Checkpoint state files: nested tensors/arrays/plain values round-trip; RNG state restores the stream."""

import random

import numpy as np
import torch

from attent_scale.checkpoint import load_state, rng_state, save_state, set_rng_state


def test_nested_state_round_trips(tmp_path):
    state = {
        "progress": {"step": 7, "loss": 1.5, "name": "x", "bits": np.array([True, False, True])},
        "teacher": {"ledger": {"ids": torch.arange(5), "loss": torch.rand(5)}, "cycle": 2},
        "list": [torch.ones(2), 3, {"k": np.arange(3, dtype=np.int64)}],
        "none": None,
    }
    save_state(tmp_path / "rank-00000", state)
    back = load_state(tmp_path / "rank-00000")
    assert back["progress"]["step"] == 7 and back["progress"]["name"] == "x"
    assert back["progress"]["bits"].tolist() == [True, False, True]
    assert torch.equal(back["teacher"]["ledger"]["ids"], torch.arange(5))
    assert torch.equal(back["teacher"]["ledger"]["loss"], state["teacher"]["ledger"]["loss"])
    assert back["teacher"]["cycle"] == 2
    assert torch.equal(back["list"][0], torch.ones(2)) and back["list"][1] == 3
    assert back["list"][2]["k"].tolist() == [0, 1, 2]
    assert back["none"] is None


def test_rng_state_round_trips(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_state(tmp_path / "rng", {"rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    set_rng_state(load_state(tmp_path / "rng")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]


def test_an_array_met_twice_is_stored_once_and_stays_shared(tmp_path):
    """The epoch's selection bits are held by the trainer and by the teacher's cache: one copy on disk,
    also after a resume (where both become views of one loaded tensor) and a second save."""
    from safetensors import safe_open

    bits = np.arange(1000, dtype=np.uint8)
    save_state(tmp_path / "a", {"progress": {"selection_bits": bits}, "teacher": {"cache_bits": bits}})
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 1  # noqa: SIM118
    back = load_state(tmp_path / "a")
    a, b = back["progress"]["selection_bits"], back["teacher"]["cache_bits"]
    assert a.tolist() == b.tolist() == bits.tolist()
    save_state(tmp_path / "b", back)  # two arrays over one memory: still one tensor, no safetensors error
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 1  # noqa: SIM118
    assert (tmp_path / "b.safetensors").stat().st_size < 2 * bits.nbytes
