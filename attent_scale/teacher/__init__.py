"""Globally consistent AtteNT example selection: schedules, strategies, ledger, distributed top-k, Teacher,
and the TeacherSession every trainer holds."""

from attent_scale.data.selection import Selection
from attent_scale.teacher.ledger import Ledger, block_owner, block_range
from attent_scale.teacher.plan import Batching, EpochPlan
from attent_scale.teacher.records import PHASES, RECORD_KEYS, RecordWriter, make_record, read_records
from attent_scale.teacher.schedules import interval_at, ratio_at
from attent_scale.teacher.session import Budget, EpochStart, Scorer, SelectionState, TeacherSession
from attent_scale.teacher.strategies import gumbel_noise, strategy_keys, uniform_noise
from attent_scale.teacher.teacher import STAT_KEYS, ScoringStopped, StopRequest, Teacher
from attent_scale.teacher.topk import SelectionMismatchError, key_image, select_global

__all__ = [
    "PHASES",
    "RECORD_KEYS",
    "STAT_KEYS",
    "Batching",
    "Budget",
    "EpochPlan",
    "EpochStart",
    "Ledger",
    "RecordWriter",
    "Scorer",
    "ScoringStopped",
    "Selection",
    "SelectionMismatchError",
    "SelectionState",
    "StopRequest",
    "Teacher",
    "TeacherSession",
    "block_owner",
    "block_range",
    "gumbel_noise",
    "interval_at",
    "key_image",
    "make_record",
    "ratio_at",
    "read_records",
    "select_global",
    "strategy_keys",
    "uniform_noise",
]
