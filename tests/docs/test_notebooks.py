"""Docs tier: every tutorial notebook runs top to bottom without an error.

The book executes the same notebooks at every build (``docs/_config.yml``); this test gives
the same guarantee inside ``pytest``, with the failing cell and its traceback in the report.
Notebooks run in their own folder, on the default kvcl device (``KVCL_DEVICE`` applies).

Skipped, with the reason, when the notebook tools are missing: they come with the ``docs``
extra (``pip install -e ".[docs]"``), not with ``dev``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = int(os.environ.get("KVCL_NOTEBOOK_TIMEOUT", "300"))  # a cold kernel build is slow


def _require(module: str):
    return pytest.importorskip(
        module, reason=f"{module} is not installed; the notebook tests need the docs extra "
                       f"(pip install -e '.[docs]')")


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path):
    nbformat = _require("nbformat")
    nbclient = _require("nbclient")
    _require("ipykernel")
    _require("matplotlib")
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    env_backend = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "Agg"  # the kernel inherits it: no display needed
    try:
        client = nbclient.NotebookClient(
            nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False,
            resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute()
        except CellExecutionError as exc:  # the message holds the cell source and traceback
            pytest.fail(f"{path.name}: a cell raised\n{exc}", pytrace=False)
    finally:
        if env_backend is None:
            os.environ.pop("MPLBACKEND", None)
        else:
            os.environ["MPLBACKEND"] = env_backend

    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
