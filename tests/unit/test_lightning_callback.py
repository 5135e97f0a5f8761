"""AttentCallback's checks at construction: a teacher config is checked like a YAML one; online is refused."""

from __future__ import annotations

import pytest

from attent_scale.config import TeacherConfig
from attent_scale.errors import UserError


@pytest.mark.parametrize("bad,message", [
    (dict(mode="online"), "teacher.mode 'online'"),
    (dict(mode="ledger", strategy="hardest"), "teacher.strategy"),
    (dict(mode="ledger", score="excess"), "teacher.reference"),
])
def test_bad_teacher_config_raises_at_construction(bad: dict, message: str) -> None:
    from hf_worker import ToyPairs

    from attent_scale.integrations.lightning import AttentCallback
    from attent_scale.integrations.sampler import PadCollator

    with pytest.raises(UserError, match=message):
        AttentCallback(ToyPairs(), batch_size=8, collate_fn=PadCollator(0),
                       teacher_config=TeacherConfig(**bad))
