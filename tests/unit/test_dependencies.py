"""pyproject.toml declares ranges the code runs with: each version-sensitive API it uses sets a floor, one
floor per package (base and extras agree), no cap below the next major, vendor builds accepted; every
optional package is an extra that attent_scale/extras.py names in its one-line error."""

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


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in _project()["dependencies"]]
    return {r.name: r for r in reqs}


def _code() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "attent_scale").rglob("*.py")))


@pytest.mark.parametrize(("package", "pattern", "first"), NEEDS)
def test_declared_floor_covers_the_apis_the_code_uses(package: str, pattern: str, first: str) -> None:
    req = _requirements()[package]
    assert re.search(pattern, _code(), re.S), f"{pattern!r} no longer used: drop this row"
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    # a pre-release floor (2.6.0a0: what vendor builds of 2.6 call themselves) counts as its release
    assert floors and min(f.release for f in floors) >= Version(first).release, \
        f"{req}: the code needs {package} >= {first}"


@pytest.mark.parametrize("version", [INSTALLED_TORCH, "2.13.0+cpu", "2.6.0a0+ecf3bae40a.nv25.01", "2.15.0",
                                     "2.99.0"])
def test_declared_ranges_accept_the_tested_torch_the_next_and_a_vendor_build(version: str) -> None:
    assert _requirements()["torch"].specifier.contains(version), version


def test_one_floor_per_package_across_base_and_extras() -> None:
    seen: dict[str, set[str]] = {}
    groups = {"base": _project()["dependencies"], **_project()["optional-dependencies"]}
    for reqs in groups.values():
        for r in map(Requirement, reqs):
            if r.name != "attent-scale":
                seen.setdefault(r.name, set()).add(str(r.specifier))
    assert {n: s for n, s in seen.items() if len(s) > 1} == {}


def test_every_optional_package_is_an_extra_the_error_names() -> None:
    from attent_scale.extras import EXTRAS

    extras = _project()["optional-dependencies"]
    for module, extra in EXTRAS.items():
        names = {Requirement(r).name for r in extras[extra]}
        assert module.replace("_", "-") in names, (module, extra, names)  # pytorch_lightning
    assert set(EXTRAS.values()) == set(extras) - {"dev", "all"}
    assert {Requirement(r).name for r in extras["all"]} == {"attent-scale"}
    assert set(Requirement(extras["all"][0]).extras) == set(EXTRAS.values())
    base = set(_requirements())
    assert not base & set(EXTRAS), f"optional packages in the base install: {base & set(EXTRAS)}"
