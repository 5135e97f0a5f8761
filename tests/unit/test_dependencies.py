"""pyproject.toml declares ranges the code runs with: each version-sensitive API it uses sets a floor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# (package, a pattern of the code that needs it, the first version that has it)
NEEDS = [
    ("numpy", r"np\.bitwise_count\(", "2.0"),
    ("transformers", r"(from_pretrained|from_config)\([^)]*\bdtype=", "4.56"),  # torch_dtype before 4.56
    ("torch", r"from torch\.distributed\.fsdp import [^\n]*fully_shard", "2.6"),  # FSDP2's public module
]
INSTALLED_TORCH = "2.13.0"  # the torch the suite runs with must satisfy the declared range


def _requirements() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return {r.name: r for r in reqs}


def _code() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "attent_scale").rglob("*.py")))


@pytest.mark.parametrize(("package", "pattern", "first"), NEEDS)
def test_declared_floor_covers_the_apis_the_code_uses(package: str, pattern: str, first: str) -> None:
    req = _requirements()[package]
    assert re.search(pattern, _code(), re.S), f"{pattern!r} no longer used: drop this row"
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors and min(floors) >= Version(first), f"{req}: the code needs {package} >= {first}"


def test_declared_ranges_accept_the_tested_torch() -> None:
    assert _requirements()["torch"].specifier.contains(INSTALLED_TORCH)
