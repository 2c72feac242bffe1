"""The quickstart notebook executes top to bottom (so it cannot rot)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel starts in the repository root, as a user's Jupyter would, so the packages import from there too.
    root = str(NOTEBOOK.parent.parent)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": root}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "7,241,732,096 parameters" in outputs
    assert "per rank" in outputs
    assert "per-example gradient norms" in outputs and "member 1 alone gives the same logits: True" in outputs
