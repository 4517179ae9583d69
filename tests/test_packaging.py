"""The wheel that ``pip install .`` builds carries every module of goma_twisted."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_for_setuptools() -> None:
    """A package missing from ``tool.setuptools.packages`` is left out of the
    installed copy: with ``goma_twisted.accel`` missing, an installed goma-pt
    silently ran the plain relay only."""
    # Read without tomllib, which PyPy's Python 3.9 lacks.
    setuptools = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools]", 1)[1]
    declared = set(re.findall(r'"([\w.]+)"', setuptools.split("]", 1)[0]))
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "goma_twisted").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert found, "no package found under goma_twisted"
    assert found <= declared, sorted(found - declared)
