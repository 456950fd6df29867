"""Every notebook runs top to bottom (with small sizes) in a fresh kernel."""

from pathlib import Path

import pytest
from conftest import SHARED_DATA

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
SMALL = {"DFLASHDECONV_NOTEBOOK_SPOTS": "20000", "DFLASHDECONV_NOTEBOOK_DEPTH": "1500",
         "DFLASHDECONV_NOTEBOOK_EPOCHS": "3"}


def test_there_are_three_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    if "histology" in path.name and not (SHARED_DATA / "her2st").exists():
        pytest.skip(f"HER2ST data not available in {SHARED_DATA}")
    monkeypatch.setenv("DFLASHDECONV_SHARED_DATA", str(SHARED_DATA))
    for name, value in SMALL.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DFLASHDECONV_NOTEBOOK_DIR", str(tmp_path))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the maps were drawn
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "dashboard:" in text
