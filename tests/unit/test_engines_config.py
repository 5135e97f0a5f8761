"""DeepSpeed JSON fill-in, engine config ranges and single-process dist helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_worker import REPO, tiny_config

from attent_scale.config import config_from_dict
from attent_scale.dist import (
    all_reduce_flag,
    barrier,
    choose_cuda_device,
    collective_device,
    init_distributed,
)
from attent_scale.engines.base import resolve_dtype
from attent_scale.engines.deepspeed import load_ds_config
from attent_scale.errors import UserError


def test_ds_config_filled_from_train_section() -> None:
    cfg = config_from_dict(tiny_config("deepspeed", grad_accum_steps=3, micro_batch_size=5, grad_clip=0.5))
    ds = load_ds_config(cfg, world_size=4, device=torch.device("cpu"))
    assert ds["train_micro_batch_size_per_gpu"] == 5 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 60 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"]["enabled"] is False  # 'auto' resolves to fp32 on CPU
    assert load_ds_config(cfg, 1, torch.device("cuda"), bf16_supported=True)["bf16"]["enabled"] is True
    assert load_ds_config(cfg, 1, torch.device("cuda"), bf16_supported=False)["bf16"]["enabled"] is False
    # bf16 or not, gradients are accumulated and reduced in fp32 unless the JSON says otherwise
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    for stage in (2, 3):  # the shipped JSONs parse and are passed through
        raw = json.loads((REPO / "configs" / f"deepspeed_zero{stage}.json").read_text())
        assert raw["zero_optimization"]["stage"] == stage


def test_ds_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 1}}')
    raw = tiny_config("deepspeed")
    raw["engine"]["deepspeed_config"] = str(bad)
    with pytest.raises(UserError, match="stage must be 2 or 3"):
        load_ds_config(config_from_dict(raw), 1, torch.device("cpu"))
    bad.write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON"):
        load_ds_config(config_from_dict(raw), 1, torch.device("cpu"))
    raw["engine"]["deepspeed_config"] = str(tmp_path / "missing.json")
    with pytest.raises(UserError, match="missing.json"):
        load_ds_config(config_from_dict(raw), 1, torch.device("cpu"))


def test_deepspeed_without_a_json_uses_the_packaged_zero3_and_bare_names_are_packaged_jsons() -> None:
    # a user switching engines with --set engine.name=deepspeed need not know where the JSON lives
    raw = tiny_config("deepspeed")
    raw["engine"].pop("deepspeed_config", None)
    cfg = config_from_dict(raw)
    assert cfg.engine.deepspeed_config is None
    assert load_ds_config(cfg, 1, torch.device("cpu"))["zero_optimization"]["stage"] == 3
    raw["engine"]["deepspeed_config"] = "deepspeed_zero2"
    assert load_ds_config(config_from_dict(raw), 1, torch.device("cpu"))["zero_optimization"]["stage"] == 2
    raw["engine"]["deepspeed_config"] = "deepspeed_zero9"
    with pytest.raises(UserError, match="deepspeed_zero9"):
        load_ds_config(config_from_dict(raw), 1, torch.device("cpu"))


@pytest.mark.parametrize(("key", "value"), [("engine.loss_chunk_tokens", 0), ("train.adam_beta2", 1.0),
                                            ("model.lora.dropout", 1.0), ("train.weight_decay", -0.1)])
def test_engine_config_ranges(key: str, value: object) -> None:
    section, name = key.rsplit(".", 1)
    raw: dict = {}
    node = raw
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[name] = value
    with pytest.raises(UserError, match=key.replace(".", "\\.")):
        config_from_dict(raw)


def test_single_process_dist_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, None)
    assert all_reduce_flag(True) is True and all_reduce_flag(False, "min") is False
    barrier()
    with pytest.raises(ValueError):
        all_reduce_flag(True, "sum")


def test_ds_config_keeps_the_users_dtypes(tmp_path: Path) -> None:
    custom = tmp_path / "ds.json"
    user = {"zero_optimization": {"stage": 3}, "data_types": {"grad_accum_dtype": "bf16"},
            "communication_data_type": "bf16"}
    custom.write_text(json.dumps(user))
    raw = tiny_config("deepspeed")
    raw["engine"]["deepspeed_config"] = str(custom)
    raw["engine"]["mixed_precision"] = "bf16"
    ds = load_ds_config(config_from_dict(raw), 1, torch.device("cpu"))
    assert ds["bf16"]["enabled"] is True  # an explicit bf16 is taken as asked, CPU or not
    assert ds["data_types"]["grad_accum_dtype"] == "bf16" and ds["communication_data_type"] == "bf16"
    for stage in (2, 3):  # the shipped configs overlap gradient reduction with backward
        raw = json.loads((REPO / "configs" / f"deepspeed_zero{stage}.json").read_text())
        assert raw["zero_optimization"]["overlap_comm"] is True


def test_mixed_precision_auto_needs_bf16_support() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype("auto", cuda, bf16_supported=True)[0] == torch.bfloat16
    dtype, why = resolve_dtype("auto", cuda, bf16_supported=False)
    assert dtype == torch.float32 and "no bf16 support" in why
    assert resolve_dtype("auto", cpu)[0] == torch.float32
    assert resolve_dtype("bf16", cpu)[0] == torch.bfloat16
    assert resolve_dtype("fp32", cuda, bf16_supported=True)[0] == torch.float32


def test_one_device_per_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [choose_cuda_device(r, 4, 4) for r in range(4)] == [0, 1, 2, 3]
    assert choose_cuda_device(0, 1, 8) == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(UserError, match=r"LOCAL_WORLD_SIZE 4: only 2 CUDA device\(s\) visible "
                                        r"\(CUDA_VISIBLE_DEVICES=2,3\)"):
        choose_cuda_device(1, 4, 2)  # never a silent modulo that shares a device
    with pytest.raises(UserError, match="LOCAL_RANK 2"):
        choose_cuda_device(2, 2, 2)
    with pytest.raises(UserError, match="no CUDA device"):
        choose_cuda_device(0, 1, 0)


def test_collective_device_follows_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    assert collective_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collective_device() == torch.device("cuda", 3)  # NCCL takes no CPU tensors
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")
