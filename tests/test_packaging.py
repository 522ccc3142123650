"""The package metadata ships every subpackage (a wheel install must not miss one)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "lit_rlhf").rglob("__init__.py")
        if "callbacks" not in p.parent.relative_to(ROOT).parts  # mapped from ./callbacks
    }
    found |= {"lit_rlhf.callbacks"}
    assert found == listed, (
        f"in the tree, not listed: {found - listed}; listed, absent: {listed - found}"
    )
