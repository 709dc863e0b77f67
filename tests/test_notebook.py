"""notebooks/knowtuning_colab.ipynb executes headless (nbclient) in smoke mode and shows the report and plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "knowtuning_colab.ipynb"


def _parameters_cell(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def test_notebook_is_committed_clean_and_parameterised() -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "commit the notebook with outputs cleared"
    source = nb.cells[_parameters_cell(nb)].source
    for line in ("SMOKE = False", 'CONFIG = "configs/world-tiny.yaml"', 'HF_MODEL_DIR = ""', 'RUN_DIR = "runs/colab"'):
        assert line in source


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_notebook_smoke_run_shows_report_and_plots(tmp_path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = _parameters_cell(nb)
    run_dir = tmp_path / "run"
    # papermill-style: the injected values follow the defaults in the same cell.
    injected = f"SMOKE = True\nRUN_DIR = {json.dumps(str(run_dir))}\n"
    nb.cells[index].source += "\n# injected by tests/test_notebook.py\n" + injected
    # The kernel gets one CPU device: not the 8 emulated devices conftest exports for the other tests.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=env)  # raises CellExecutionError (with the cell's traceback) when a cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    markdown = [o.data["text/markdown"] for o in outputs if o.output_type == "display_data"
                and "text/markdown" in o.data]
    report = (run_dir / "report.md").read_text()
    assert report.strip() in [m.strip() for m in markdown], "report.md was not displayed"
    for label in ("| SFT |", "| KA-SFT (-KC) |", "| KnowTuning |", "completeness"):
        assert label in report
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    pngs = sorted((run_dir / "eval" / "plots").glob("*.png"))
    assert pngs and len(images) == len(pngs)
    assert all(o.data["image/png"] for o in images)
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "1 x cpu device(s)" in text
    assert (run_dir / "summary.json").exists() and (run_dir / "config.yaml").exists()
