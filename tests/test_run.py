"""The one run API (xm2.run): what a user writes after `xm2 fit` works the same inside a study.

Runs are real: the recipe's parser, a real MLflow store, real multi-process gloo groups for the
distributed strategies (as an `xm2` subprocess, the way a study runs them with isolated=True).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import CORPUS, ROOT
from xm2.errors import RunFailed
from xm2.run import config_text, override_args, resolve, run
from xm2.studies.decay import stable_mix_for_decay

NANO, SMOKE = str(ROOT / "config" / "nano.yaml"), str(ROOT / "tests" / "configs" / "smoke.yaml")
CONSOLE_SCRIPT = Path(sys.executable).parent / "xm2"


def data_args(tmp_path: Path, tokenizer_path: Path, shards: Path) -> list[str]:
    return ["--data.corpus_dir", str(CORPUS), "--data.tokenizer_path", str(tokenizer_path),
            "--data.shards_dir", str(shards.parent),
            "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db",
            "--trainer.default_root_dir", str(tmp_path / "runs")]


def class_paths(config: dict) -> list[str]:
    return [callback["class_path"] for callback in config["trainer"]["callbacks"]]


def test_callbacks_plus_in_later_configs_add_to_the_recipes(tmp_path):
    (tmp_path / "a.yaml").write_text("trainer:\n  callbacks+:\n"
                                     "    - class_path: lightning.pytorch.callbacks.Timer\n")
    (tmp_path / "b.yaml").write_text("trainer:\n  callbacks+:\n"
                                     "    - class_path: lightning.pytorch.callbacks.DeviceStatsMonitor\n")
    recipe = class_paths(resolve("fit", [NANO]))
    both = class_paths(resolve("fit", [NANO, tmp_path / "a.yaml", tmp_path / "b.yaml"]))
    # Two `callbacks+:` lists both add; neither replaces the other or the recipe's.
    assert both == [*recipe, "lightning.pytorch.callbacks.Timer",
                    "lightning.pytorch.callbacks.DeviceStatsMonitor"]


def test_a_second_config_and_overrides_compose_as_on_the_command_line():
    config = resolve("fit", [NANO, ROOT / "config" / "model" / "tiny.yaml"],
                     override_args({"model.optimizer.lr": 0.02, "data.decay": {"prose": 1.0}}))
    tiny = resolve("fit", [ROOT / "config" / "model" / "tiny.yaml"])
    assert config["model"]["architecture"]["hidden_size"] == tiny["model"]["architecture"]["hidden_size"]
    assert config["model"]["optimizer"]["lr"] == 0.02
    assert config["data"]["decay"] == {"prose": 1.0}
    # One fact, one home: the data's decay start is the schedule's.
    assert config["data"]["decay_start_step"] == config["model"]["schedule"]["decay_start_step"]


def test_the_decay_study_reads_mixtures_as_the_run_would():
    """The old hand-written reader ignored `--data.decay=...` given as one word."""
    mixture = stable_mix_for_decay([NANO], ['--data.decay={"prose": 0.5, "code": 0.5}'])
    assert mixture == {"prose": 0.4, "code": 0.3, "docs": 0.3}  # decay-only sources: none
    with_instruct = stable_mix_for_decay([NANO], [])
    assert with_instruct["instruct_math"] == 0.0 and with_instruct["prose"] == 0.4


def test_config_text_is_what_print_config_prints_and_runs_as_is(tmp_path):
    text = config_text("fit", [NANO], ["--model.optimizer.lr=0.03"])
    printed = subprocess.run([str(CONSOLE_SCRIPT), "fit", "--config", NANO,
                              "--model.optimizer.lr=0.03", "--print_config"],
                             capture_output=True, text=True, check=True).stdout
    assert text == printed
    (tmp_path / "run.yaml").write_text(text)
    assert resolve("fit", [tmp_path / "run.yaml"])["model"]["optimizer"]["lr"] == 0.03


@pytest.mark.slow
def test_a_run_is_tracked_exactly_as_xm2_fit_tracks_it(tmp_path, tokenizer_path, shards):
    """The same config through the API and through the console script: the same params, tags,
    artefacts and checkpoint records."""
    runs = {}
    for way in ("api", "cli"):
        folder = tmp_path / way
        args = [*data_args(folder, tokenizer_path, shards), "--data.decay", '{"prose": 1.0}']
        if way == "api":
            result = run("fit", [NANO, SMOKE], args, quiet=True)
            assert result.status == "finished" and result.steps == 12
            assert Path(result.last_checkpoint).name == "last.ckpt"
            assert [Path(p).name for p in result.checkpoints] == ["step=6.ckpt", "step=12.ckpt"]
            assert result.metrics["val/loss"] > 0
        else:
            subprocess.run([str(CONSOLE_SCRIPT), "fit", "--config", NANO, "--config", SMOKE, *args],
                           capture_output=True, text=True, check=True, cwd=folder.parent)
        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        (logged,) = client.search_runs([client.get_experiment_by_name("xm2").experiment_id])
        runs[way] = (client, logged)
    (api_client, api), (cli_client, cli) = runs["api"], runs["cli"]
    path_like = {"data/tokenizer_path", "data/shards_dir", "data/corpus_dir"}
    assert {k: v for k, v in api.data.params.items() if k not in path_like} == \
        {k: v for k, v in cli.data.params.items() if k not in path_like}
    assert api.data.params["data/decay/prose"] == "1.0"
    assert {"xm2.git_commit", "xm2.git_dirty"} <= set(api.data.tags)
    assert api.data.tags["xm2.git_commit"] == cli.data.tags["xm2.git_commit"]
    assert api.info.status == cli.info.status == "FINISHED"
    assert {a.path for a in api_client.list_artifacts(api.info.run_id)} == \
        {a.path for a in cli_client.list_artifacts(cli.info.run_id)}
    records = [json.loads((tmp_path / way / "runs").rglob("step=12.ckpt.json").__next__()
                          .read_text()) for way in ("api", "cli")]
    assert records[0]["run_id"] == api.info.run_id and records[1]["run_id"] == cli.info.run_id
    assert set(records[0]) == set(records[1])


@pytest.mark.slow
def test_a_diverged_run_is_a_result_not_an_error(tmp_path, tokenizer_path, shards):
    result = run("fit", [NANO, SMOKE], [*data_args(tmp_path, tokenizer_path, shards),
                                        "--model.optimizer.lr=1e30"], quiet=True)
    assert result.status == "diverged" and "loss is nan" in result.error
    run_info = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id).info
    assert run_info.status == "FAILED"


def test_an_isolated_run_that_fails_says_why_in_one_line(tmp_path):
    with pytest.raises(RunFailed, match=r"`xm2 fit` failed: .*warmup_steps=-1 must be >= 0"):
        run("fit", [NANO], ["--model.schedule.warmup_steps=-1"], isolated=True)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp2"])
def test_every_strategy_runs_through_the_run_api(strategy, tmp_path, tokenizer_path, shards):
    devices = [] if strategy == "single" else ["--trainer.devices=2"]
    result = run("fit", [NANO, SMOKE, ROOT / "config" / "trainer" / f"{strategy}.yaml"],
                 [*data_args(tmp_path, tokenizer_path, shards), *devices,
                  "--trainer.accelerator=cpu", "--trainer.max_steps=6",
                  "--model.schedule.decay_start_step=4"], isolated=True)
    assert result.status == "finished" and result.steps == 6
    logged = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["trainer/devices"] == ("1" if strategy == "single" else "2")


def test_the_gpu_only_strategy_parses_through_the_run_api():
    config = resolve("fit", [NANO, ROOT / "config" / "trainer" / "fsdp1.yaml"])
    assert config["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
