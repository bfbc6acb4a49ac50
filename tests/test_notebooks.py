"""The notebooks run headlessly, top to bottom, against real services; each asserts on its own results.

Each runs in a fresh kernel (nbclient) with the session's broker (``KAFKA_BOOTSTRAP``); the rest (a Ray,
a Ray cluster with the Jobs API, PostgreSQL, Redis, Ray Serve) each notebook starts and stops itself, as it
does for a user without those variables. A failing cell fails the test with the cell's error.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_exist():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_outputs_are_stripped_in_git(path):
    raw = subprocess.run(["git", "show", f"HEAD:{path.relative_to(ROOT)}"], cwd=ROOT, capture_output=True, text=True)
    text = raw.stdout if raw.returncode == 0 else path.read_text()  # not committed yet: the working copy
    nb = json.loads(text)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: outputs are committed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_its_checks_pass(path, broker, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert any("assert" in c.source for c in nb.cells if c.cell_type == "code"), "a notebook checks its own results"
    env_before = dict(os.environ)
    os.environ.update({"KAFKA_BOOTSTRAP": broker.address, "NOTEBOOK_WORKDIR": str(tmp_path), "MPLBACKEND": "Agg",
                       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
