"""The decay study end to end: a stable run, real branches from it, the summary, the notebook."""

import json

import pytest
from mlflow import MlflowClient

from tests.conftest import CORPUS, ROOT
from tests.test_cli import smoke_args, xm2
from tests.test_notebooks import execute, images, text

CONFIGS = [str(ROOT / "config" / "nano.yaml"), str(ROOT / "tests" / "configs" / "smoke.yaml"),
           str(ROOT / "tests" / "configs" / "decay_study.yaml")]


@pytest.fixture(scope="module")
def study(tmp_path_factory, tokenizer_path, shards):
    folder = tmp_path_factory.mktemp("decay-study")
    args = smoke_args(folder, tokenizer_path, shards)
    stable = xm2("fit", *args, "--config", CONFIGS[2], cwd=folder)
    assert stable.returncode == 0, stable.stderr[-3000:]
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("xm2").experiment_id])
    overrides = ["--data.corpus_dir", str(CORPUS), "--data.tokenizer_path", str(tokenizer_path),
                 "--data.shards_dir", str(shards.parent),
                 "--trainer.default_root_dir", str(folder / "runs")]
    result = xm2("decay-study", run.info.run_id, "--configs", json.dumps(CONFIGS),
                 "--tracking_uri", uri, "--runs_dir", str(folder / "runs"),
                 "--decay_fraction", "0.5", "--overrides", json.dumps(overrides),
                 "--output", str(folder / "study"), cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    (study_run,) = client.search_runs([run.info.experiment_id], "tags.`xm2.study` = 'decay'")
    return {"folder": folder, "uri": uri, "client": client, "stable": run,
            "study": study_run, "stdout": result.stdout}


@pytest.mark.slow
def test_the_study_branches_every_stable_checkpoint_and_compares_the_decay_data(study):
    client, stable_id = study["client"], study["stable"].info.run_id
    summary_path = study["folder"] / "study" / study["study"].info.run_id / "summary.json"
    summary = json.loads(summary_path.read_text())
    rows = {(r["source_step"], r["mixture"]): r for r in summary["branches"]}
    # Stable-phase checkpoints at steps 4 and 8 (the decay starts at 12); the comparison at 8.
    assert set(rows) == {(4, "decay"), (8, "decay"), (8, "stable")}
    assert rows[(4, "decay")]["end_step"] < rows[(8, "decay")]["end_step"]
    for row in rows.values():
        run = client.get_run(row["run_id"])
        assert run.data.tags["xm2.parent_run_id"] == stable_id
        assert run.info.status == "FINISHED"
        # Both branches of the comparison report the instruction sources' held-out loss.
        assert {"instruct_math", "instruct_code", "prose"} <= set(row["val_loss_by_source"])
        assert row["stable_val_loss_at_end"] is not None and row["below_stable"] is not None
    stable_mix = client.get_run(rows[(8, "stable")]["run_id"])
    assert stable_mix.data.metrics["mixture/decay/instruct_math"] == 0.0
    decay_mix = client.get_run(rows[(8, "decay")]["run_id"])
    assert decay_mix.data.metrics["mixture/decay/instruct_math"] > 0.1
    artifacts = {a.path for a in client.list_artifacts(study["study"].info.run_id)}
    assert {"wsd_branches.png", "decay_mixture.png", "summary.json"} <= artifacts
    assert "| 8 |" in study["stdout"] and "later branches end lower" in study["stdout"]


@pytest.mark.slow
def test_the_decay_study_notebook_lists_branches_and_draws_both_figures(study, monkeypatch):
    monkeypatch.setenv("XM2_TRACKING_URI", study["uri"])
    notebook = execute(ROOT / "notebooks" / "decay_study.ipynb")
    assert len(images(notebook)) == 2
    printed = text(notebook)
    assert "nano-wsd-decay-from-8-stable-mix" in printed and "nano-wsd-decay-from-4" in printed
