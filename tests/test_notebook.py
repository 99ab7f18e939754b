"""notebooks/walkthrough.ipynb: it runs top to bottom, headless, on the small budget (every cell, no error),
and the committed file carries no outputs.

    python -m pytest -q tests/test_notebook.py
"""
import json
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "walkthrough.ipynb")


def outputs_text(cell):
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", []))


def test_committed_notebook_carries_no_outputs():
    with open(NOTEBOOK, encoding="utf-8") as f:
        nb = json.load(f)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "no code cells"
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"cells {dirty} carry outputs or execution counts: clear them before committing "
                       "(Edit > Clear Outputs of All Cells, then save)")
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code), "no parameters cell"


def test_notebook_runs_top_to_bottom_on_the_small_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSLM_NOTEBOOK_BUDGET", "small")
    monkeypatch.setenv("NANOSLM_NOTEBOOK_SCRATCH", str(tmp_path / "scratch"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # raises CellExecutionError, naming the cell and its traceback, when any cell fails
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    text = "".join(outputs_text(c) for c in nb.cells)
    assert "budget     small" in text
    assert "[40, 1842, 399, 19930]" in text  # GPT-2's real ids of "I love NLP"
    assert "[260, 259]" in text  # the merge-order example: ' lowest' -> ' lo' + 'west'
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert figures >= 7, f"{figures} figures"
    # what the notebook wrote stays in its scratch directory: two runs with their checkpoints
    assert (tmp_path / "scratch" / "pretrain" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "scratch" / "chat" / "best" / "adapter.safetensors").is_file()
    assert "val response loss" in text
