"""Every script in examples/ runs to the end (each builds its own tiny model; new examples are picked up)."""

from __future__ import annotations

import glob
import os
import runpy

import pytest

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "examples", "*.py")))


def test_there_is_an_example_per_tutorial_method():
    names = {os.path.basename(path)[:2] for path in EXAMPLES}
    assert {"01", "05"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything an example writes lands in a temporary folder
    monkeypatch.setattr("sys.argv", [path])
    runpy.run_path(path, run_name="__main__")
