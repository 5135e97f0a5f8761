"""teacher.unit token in one process: the config checks, the random mask (keyed, exact share, never a padding,
prompt or filler token, other tokens each epoch), the step's divisor, the counts' state, and the reference's
one-line errors (teacher/token_step.py, engines/reference.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attent_scale.config import TeacherConfig, config_from_dict, validate_teacher
from attent_scale.engines.base import IGNORE_INDEX
from attent_scale.engines.reference import open_token_reference
from attent_scale.errors import UserError
from attent_scale.teacher.token_step import TokenStep


@pytest.mark.parametrize(("teacher", "message"), [
    ({"unit": "token", "strategy": "hard"}, "'teacher.token_reference': required by teacher.unit token"),
    ({"unit": "token", "strategy": "signal"}, "'teacher.strategy': 'signal' ranks samples"),
    ({"unit": "token", "strategy": "random", "mode": "online"}, "'teacher.unit': 'token' picks tokens"),
    ({"unit": "token", "strategy": "random", "token_ratio": 0},
     r"'teacher.token_ratio': 0.0 must be in \(0, 1\]"),
    ({"unit": "tokens"}, "teacher.unit"),
])
def test_bad_token_settings_are_one_line_naming_the_key(teacher: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        config_from_dict({"teacher": teacher})


def test_good_token_settings_pass() -> None:
    cfg = config_from_dict({"teacher": {"unit": "token", "strategy": "random", "token_ratio": 0.7,
                                        "mode": "ledger"}})
    assert cfg.teacher.unit == "token" and cfg.teacher.token_ratio == 0.7
    validate_teacher(TeacherConfig(unit="token", strategy="hard", token_reference="ref"))
    assert TeacherConfig().unit == "sample" and TeacherConfig().token_ratio == 0.6


def _micro(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 50, (6, 16), generator=g)
    targets[0, :5] = IGNORE_INDEX  # a prompt
    targets[2, 9:] = IGNORE_INDEX  # padding
    targets[4] = IGNORE_INDEX  # a row without a target
    return torch.tensor([3, 8, 1, 40, 7, -1]), targets  # the last row is a filler (id -1)


def test_random_mask_keeps_the_share_of_real_targets_only_keyed_by_seed_and_epoch() -> None:
    ids, targets = _micro()
    step = TokenStep(TeacherConfig(unit="token", strategy="random", token_ratio=0.6), seed=0, world=1)
    learner = torch.rand(targets.shape)
    w = step.weights(ids, torch.zeros_like(targets), targets, learner)
    valid = (targets != IGNORE_INDEX) & (ids >= 0)[:, None]
    assert w.dtype == torch.float32 and set(w.unique().tolist()) <= {0.0, 1.0}
    assert not w[~valid].any()  # padding, prompt, the empty row and the filler row never count
    n = int(valid.sum())
    assert int(w.sum()) == step.kept_tokens == round(0.6 * n) and step.target_tokens == n
    again = TokenStep(TeacherConfig(unit="token", strategy="random", token_ratio=0.6), seed=0, world=1)
    assert torch.equal(again.weights(ids, torch.zeros_like(targets), targets, learner * 7), w)  # no losses
    again.epoch = 1
    assert not torch.equal(again.weights(ids, torch.zeros_like(targets), targets, learner), w)
    other = TokenStep(TeacherConfig(unit="token", strategy="random", token_ratio=0.6), seed=1, world=1)
    assert not torch.equal(other.weights(ids, torch.zeros_like(targets), targets, learner), w)


def test_the_loss_is_the_mean_over_kept_tokens_of_the_step() -> None:
    ids, targets = _micro()
    targets[5] = IGNORE_INDEX  # a filler row has no target (engines.base.split_micro)
    step = TokenStep(TeacherConfig(unit="token", strategy="random", token_ratio=0.5), seed=0, world=1)
    halves = [(ids[:3], targets[:3]), (ids[3:], targets[3:])]
    divisor = step.divisor([t for _, t in halves])
    token_losses = torch.rand(targets.shape, requires_grad=True)
    total, kept = 0.0, torch.zeros(targets.shape)
    for i, (rows, tg) in enumerate(halves):
        sl = slice(0, 3) if i == 0 else slice(3, 6)
        loss = step.loss(rows, torch.zeros_like(tg), tg, token_losses[sl], divisor)
        total = total + loss
        kept[sl] = step.weights(rows, torch.zeros_like(tg), tg, token_losses[sl].detach())
    assert divisor == step.step_kept / 2  # each micro batch's kept tokens counted twice: loss and check
    mean = (token_losses.detach() * kept).sum() / kept.sum()
    assert float(total.detach()) == pytest.approx(float(mean), rel=1e-6)
    total.backward()
    assert not token_losses.grad[kept == 0].any()  # masked tokens get no gradient


def test_counts_are_the_checkpoint_entry() -> None:
    step = TokenStep(TeacherConfig(unit="token", strategy="random"), seed=0, world=1)
    ids, targets = _micro()
    step.weights(ids, torch.zeros_like(targets), targets, torch.rand(targets.shape))
    back = TokenStep(TeacherConfig(unit="token", strategy="random"), seed=0, world=1)
    back.load_state_dict(step.state_dict())
    assert (back.kept_tokens, back.target_tokens, back.share) == (step.kept_tokens, step.target_tokens,
                                                                  step.share)
    back.load_state_dict(None)  # a checkpoint from before token selection
    assert back.share == 1.0


def test_hard_without_its_reference_is_an_error() -> None:
    step = TokenStep(TeacherConfig(unit="token", strategy="hard", token_reference="x"), seed=0, world=1)
    ids, targets = _micro()
    with pytest.raises(RuntimeError, match="needs its reference"):
        step.weights(ids, torch.zeros_like(targets), targets, torch.rand(targets.shape))


def test_token_reference_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="'teacher.token_reference': .* is not a directory"):
        open_token_reference(str(tmp_path / "missing"), device=torch.device("cpu"))
    with pytest.raises(UserError, match="neither config.json"):
        open_token_reference(str(tmp_path), device=torch.device("cpu"))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="LoRA adapter, which needs the learner's peft model .* engine fsdp"):
        open_token_reference(str(tmp_path), device=torch.device("cpu"), where="engine fsdp")


def test_bench_sentence_of_a_token_arm_says_the_kept_share() -> None:
    from attent_scale.bench import token_sentence

    runs = [{"kept_token_share": 0.6}, {"kept_token_share": 0.62}]
    assert token_sentence("tok", runs) == ("tok: The loss kept 61.0% of the target tokens (teacher.unit "
                                           "token; random-mask[tok] kept the same share at random).")
    assert token_sentence("tok", runs, paid=False, numbers="it ended +0.010").endswith(
        "; it did not pay off on this run (it ended +0.010).")
    assert token_sentence("tok", [{"kept_token_share": None}]) is None
