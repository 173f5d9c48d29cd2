"""The tour notebook: committed without outputs, as ``make_tour.py`` writes it, and it runs top to bottom."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _make_tour() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_tour", NOTEBOOKS / "make_tour.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_notebook_is_generated_and_has_no_outputs():
    nb = nbformat.read(NOTEBOOKS / "tour.ipynb", as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    assert _make_tour().main(["--check"]) == 0, "run python notebooks/make_tour.py"


def test_notebook_runs_top_to_bottom(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOKS / "tour.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "max abs difference of the output tokens: 0.0e+00" in text
    assert "<All keys matched successfully>" in text
    html = "\n".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "are bit-identical" in html  # compare(converted, hf checkpoint)
    plain = [str(o.get("data", {}).get("text/plain", "")) for o in outputs]
    flagged = next(p for p in plain if "all zero" in p)
    assert [line.split()[1] for line in flagged.splitlines()[1:]] == [
        "layernorm.bias", "layers.3.mlp.fc2.weight", "layers.5.attention.v_proj.bias"]
