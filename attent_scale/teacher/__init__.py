"""Globally consistent AtteNT example selection: schedules, strategies, ledger, distributed top-k, Teacher."""

from attent_scale.data.selection import Selection
from attent_scale.teacher.epoch import EpochStart, begin_epoch
from attent_scale.teacher.ledger import Ledger, block_owner, block_range
from attent_scale.teacher.records import PHASES, RECORD_KEYS, RecordWriter, make_record, read_records
from attent_scale.teacher.schedules import interval_at, ratio_at
from attent_scale.teacher.strategies import gumbel_noise, strategy_keys, uniform_noise
from attent_scale.teacher.teacher import STAT_KEYS, EpochPlan, Teacher
from attent_scale.teacher.topk import SelectionMismatchError, key_image, select_global

__all__ = [
    "PHASES",
    "RECORD_KEYS",
    "STAT_KEYS",
    "EpochPlan",
    "EpochStart",
    "Ledger",
    "RecordWriter",
    "Selection",
    "SelectionMismatchError",
    "Teacher",
    "begin_epoch",
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
