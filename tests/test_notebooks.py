"""Every notebook executes headlessly, top to bottom, on a real run in a real MLflow store."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT
from tests.test_cli import smoke_args, xm2

# Notebooks that need a study or the analysis callbacks are executed by their own tests
# (tests/test_decay_study.py, tests/test_analysis_e2e.py, tests/test_evaluate.py).
EXECUTED_ELSEWHERE = {"decay_study.ipynb", "analysis.ipynb", "evaluation.ipynb"}
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if p.name not in EXECUTED_ELSEWHERE)


def execute(path: Path) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in its own folder, as Jupyter would; return it with outputs."""
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return notebook


def images(notebook: nbformat.NotebookNode) -> list:
    return [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]


def outputs(cell) -> str:
    return "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                   for o in cell.get("outputs", []))


def text(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(outputs(cell) for cell in notebook.cells)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tokenizer_path, shards) -> Path:
    """An MLflow store holding one finished smoke run of the nano recipe, then a validate run."""
    directory = tmp_path_factory.mktemp("tracked")
    fit = xm2("fit", *smoke_args(directory, tokenizer_path, shards), cwd=directory)
    assert fit.returncode == 0, fit.stderr[-3000:]
    (checkpoint,) = (directory / "runs").rglob("last.ckpt")
    validate = xm2("validate", *smoke_args(directory, tokenizer_path, shards),
                   "--ckpt_path", str(checkpoint), cwd=directory)
    assert validate.returncode == 0, validate.stderr[-3000:]
    return directory / "mlflow.db"


@pytest.fixture(scope="module")
def executed(tracked_run) -> dict[str, nbformat.NotebookNode]:
    """Each notebook run once, in its own folder as Jupyter would, against the tracked run."""
    notebooks = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XM2_TRACKING_URI", f"sqlite:///{tracked_run}")
        for path in NOTEBOOKS:
            notebooks[path.name] = execute(path)
    return notebooks


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_on_a_tracked_run(path, executed):
    assert images(executed[path.name]), f"{path.name} drew no figure"


@pytest.mark.slow
def test_loss_curves_picks_the_training_run_and_reports_both_phases(executed):
    notebook = executed["loss_curves.ipynb"]
    text = "\n".join(outputs(cell) for cell in notebook.cells)
    # The newest run is the validate run; the notebook must skip it for the training run.
    assert "warmup ends at step 2, decay starts at step 8" in text
    assert "instruct_math" in text and "validation loss:" in text and "at the end (step 11)" in text
