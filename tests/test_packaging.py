"""The wheel that ``pip install .`` builds carries every module of goma_twisted."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; PyPy 3.9 skips

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_for_setuptools() -> None:
    """A package missing from ``tool.setuptools.packages`` is left out of the
    installed copy: with ``goma_twisted.accel`` missing, an installed goma-pt
    silently runs the plain relay only."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "goma_twisted").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found, "no package found under goma_twisted"
    assert found <= set(declared), sorted(found - set(declared))
