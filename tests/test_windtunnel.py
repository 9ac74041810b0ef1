"""The wind tunnel: settings checks, the trial-seeded sampler, and real miniature studies (a few
trials of a few steps of a 2-layer model) run through ``xm2 windtunnel`` into a journal file
and a real MLflow store: end to end, killed and resumed, two workers on one storage."""

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.conftest import CORPUS, ROOT
from tests.test_errors import console, one_line_error
from xm2.cli import main
from xm2.errors import ConfigError, MissingFileError
from xm2.run import override_args, resolve
from xm2.studies.windtunnel.command import windtunnel
from xm2.studies.windtunnel.recipe import resolved_recipe, run_shape, shortened
from xm2.studies.windtunnel.settings import Dimension, Pruner, Runs, Sampler, SearchSpace
from xm2.studies.windtunnel.study import fail_stale_trials, make_sampler, open_storage
from xm2.studies.windtunnel.trial import run_trial
from xm2.tracking.runs import TrackedRun

EXPERIMENT = "wt-test"
PLANTED_LR = 100.0  # diverges within a step or two


def mini_settings(tmp_path: Path, tokenizer_path: Path, shards: Path, **changes) -> dict:
    """A study of 2-layer, 64-wide models, 4 steps of 4 × 32 tokens per trial."""
    settings = {
        "name": "mini",
        "trials": 4,
        "proxy": {
            "configs": [str(ROOT / "config" / "nano.yaml")],
            "tokens": 4 * 32 * 4,
            "validations": 2,
            "overrides": {
                "model.architecture.vocab_size": 512, "model.architecture.hidden_size": 64,
                "model.architecture.intermediate_size": 160, "model.architecture.num_layers": 2,
                "model.architecture.num_heads": 2, "model.architecture.max_seq_len": 32,
                "data.batch_size": 4, "data.val_batches_per_source": 1,
                "data.corpus_dir": str(CORPUS), "data.tokenizer_path": str(tokenizer_path),
                "data.shards_dir": str(shards.parent), "trainer.precision": "32-true",
                # best.yaml is this recipe: keep it seconds long as well, without the
                # recipe's analyses (they read data/eval relative to the project root).
                "trainer.max_steps": 8, "trainer.val_check_interval": 4,
                "trainer.callbacks": [
                    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"},
                    {"class_path": "callbacks.mixture.MixtureMonitor"}],
                "model.schedule.warmup_steps": 2, "model.schedule.decay_start_step": 6,
            },
        },
        "sampler": {"kind": "tpe", "seed": 3, "startup_trials": 2},
        "pruner": {"kind": "median", "startup_trials": 2, "warmup_validations": 1},
        "output_dir": str(tmp_path / "out"),
        "experiment_name": EXPERIMENT,
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
    }
    settings.update(changes)
    return settings


def as_arguments(settings: dict) -> dict:
    """The settings as the Python arguments of ``windtunnel`` (dataclasses, tuples)."""
    proxy = dict(settings["proxy"], configs=tuple(settings["proxy"]["configs"]))
    return {**settings, "proxy": Runs(**proxy), "sampler": Sampler(**settings["sampler"]),
            "pruner": Pruner(**settings["pruner"])}


def load(settings: dict) -> optuna.Study:
    storage = Path(settings["output_dir"]) / settings["name"] / "journal.log"
    return optuna.load_study(study_name=settings["name"], storage=open_storage(str(storage)))


def worker(settings: dict, config: Path, cwd: Path) -> subprocess.Popen:
    """``xm2 windtunnel --config <config>`` in its own process, as a user's terminal runs it."""
    # One thread each: several workers on a few shared cores run far slower oversubscribed.
    config.write_text(yaml.safe_dump({**settings, "torch_threads": 1}))
    return subprocess.Popen([sys.executable, "-m", "xm2.cli", "windtunnel", "--config",
                             str(config)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def children(settings: dict) -> list:
    client = MlflowClient(settings["tracking_uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    return client.search_runs([experiment], "tags.`windtunnel.role` = 'trial'")


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(("dimension", "message"), [
    (Dimension(low=0.001, high=0.1, step=0.001, log=True), "not both"),
    (Dimension(low=5, high=2), "need low < high"),
    (Dimension(choices=(32, 64), low=1), "choices or low/high"),
    (Dimension(low=0, high=1, log=True), "low > 0"),
])
def test_an_ill_formed_dimension_is_refused_by_name(dimension, message):
    with pytest.raises(ConfigError, match=message) as error:
        dimension.distribution("lr")
    assert "space.lr" in str(error.value)


def test_the_default_space_is_the_papers_and_an_empty_one_is_refused():
    space = SearchSpace().distributions()
    assert space["scale_emb"].low == 2 and space["scale_emb"].high == 20
    assert space["scale_emb"].step == 1
    assert space["dim_model_base"].choices == (32, 64, 128, 256, 512, 1024)
    assert (space["scale_depth"].low, space["scale_depth"].high) == (1.0, 5.0)
    assert space["lr"].log and (space["lr"].low, space["lr"].high) == (0.001, 0.1)
    with pytest.raises(ConfigError, match="space is empty"):
        SearchSpace(None, None, None, None, None).distributions()


def test_a_trial_is_the_recipe_shortened_to_the_token_budget():
    runs = Runs(configs=(str(ROOT / "config" / "nano.yaml"),), tokens=100 * 4096, validations=4,
                warmup_fraction=0.1, decay_fraction=0.2)
    recipe = resolved_recipe(runs)
    shape = run_shape(recipe, runs)  # nano: 16 rows × 256 tokens per step
    assert (shape.steps, shape.validation_interval, shape.tokens_per_step) == (100, 25, 4096)
    assert (shape.warmup_steps, shape.decay_start_step) == (10, 80)
    short = shortened(runs, shape, {"lr": 0.02, "dim_model_base": 64})
    # The trial as xm2 fit parses it: the overrides after the recipe's configs.
    config = resolve("fit", runs.configs, override_args(short.overrides))
    assert config["model"]["optimizer"]["lr"] == 0.02
    assert config["model"]["architecture"]["dim_model_base"] == 64
    assert config["trainer"]["max_steps"] == 100 and config["trainer"]["val_check_interval"] == 25
    assert config["trainer"]["enable_checkpointing"] is False
    assert config["model"]["schedule"] == {**recipe["model"]["schedule"], "warmup_steps": 10,
                                           "decay_start_step": 80}
    assert config["data"]["decay_start_step"] == 80  # linked: the data switch moves with it
    assert config["trainer"]["logger"] == recipe["trainer"]["logger"]  # the recipe's own logger
    assert recipe["trainer"]["max_steps"] == 300  # the recipe itself is untouched
    with pytest.raises(MissingFileError, match="no/such.yaml"):
        resolved_recipe(Runs(configs=("no/such.yaml",)))


def test_transfer_refuses_a_study_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="no study 'absent'.*run the search first"):
        windtunnel(name="absent", action="transfer", output_dir=str(tmp_path),
                   proxy=Runs(configs=(str(ROOT / "config" / "nano.yaml"),)),
                   tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(ConfigError, match="action='fit'; allowed: search, transfer, summary"):
        windtunnel(action="fit")


def test_a_garbled_journal_is_one_line_naming_the_file_the_line_and_the_recovery(tmp_path):
    journal = tmp_path / "journal.log"
    study = optuna.create_study(study_name="windtunnel", storage=open_storage(str(journal)))
    study.optimize(lambda trial: trial.suggest_float("lr", 0.001, 0.1), n_trials=2)
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[2] = bytes([lines[2][0] ^ 0xFF]) + lines[2][1:]  # one flipped byte: not JSON any more
    journal.write_bytes(b"".join(lines))
    result = console("windtunnel", "--storage", str(journal), "--output_dir", str(tmp_path),
                     "--proxy.configs", f"[{ROOT / 'config' / 'nano.yaml'}]",
                     "--tracking_uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert one_line_error(result) == (
        f"xm2: error: windtunnel journal {journal} is damaged at line 3 (not an Optuna journal "
        f"entry), so the study cannot be read. Move it away (mv {journal} {journal}.damaged) to "
        "start the study afresh, or keep the study as it was before the damage: head -n 2 "
        f"{journal}.damaged > {journal}")
    assert not (tmp_path / "mlflow.db").exists()  # refused before a parent run was made
    # The advice works: the lines before the damage are a study Optuna reads.
    journal.write_bytes(b"".join(lines[:2]))
    assert optuna.get_all_study_names(open_storage(str(journal))) == ["windtunnel"]


@pytest.mark.parametrize("kind", ["tpe", "gp"])
def test_trial_n_is_proposed_with_seed_plus_n_whatever_the_process(kind):
    space = {"x": optuna.distributions.FloatDistribution(-3, 3),
             "n": optuna.distributions.IntDistribution(0, 10)}

    def proposals(finished_before_restart: int) -> list[dict]:
        study = optuna.create_study(sampler=make_sampler(Sampler(kind, seed=7, startup_trials=2)))
        points = []
        for number in range(5):
            if number == finished_before_restart:  # a new process: a new sampler object
                study.sampler = make_sampler(Sampler(kind, seed=7, startup_trials=2))
            trial = study.ask(space)
            study.tell(trial, (trial.params["x"] - 1) ** 2 + trial.params["n"])
            points.append(trial.params)
        return points

    uninterrupted = proposals(finished_before_restart=-1)
    assert proposals(finished_before_restart=3) == uninterrupted
    assert len({tuple(point.values()) for point in uninterrupted}) == 5


def test_trials_of_a_gone_worker_are_failed_with_the_reason_and_live_ones_kept(tmp_path):
    backend = open_storage(str(tmp_path / "journal.log"))
    study = optuna.create_study(study_name="stale", storage=backend)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    workers = {"dead": f"{socket.gethostname()}:{ended.stdout.strip()}",
               "alive": f"{socket.gethostname()}:{os.getpid()}",
               "silent": "another-host:1", "beating": "another-host:2"}
    for worker in workers.values():
        trial = study.ask()
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("heartbeat", time.time() - (1000 if worker.endswith(":1") else 0))

    # No MLflow run is named, so no tracking store is touched.
    assert fail_stale_trials(study, backend, 900.0, tracking_uri="unused") == [0, 2]
    trials = optuna.load_study(study_name="stale", storage=open_storage(
        str(tmp_path / "journal.log"))).get_trials()  # as another process reads the journal
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING,
                                         TrialState.FAIL, TrialState.RUNNING]
    assert trials[0].user_attrs["failure"] == f"worker {workers['dead']} gone"
    assert trials[2].user_attrs["failure"] == "worker another-host:1 gone"
    assert fail_stale_trials(study, backend, 900.0, tracking_uri="unused") == []


# ----------------------------------------------------------------------------- one trial, one path

KEPT = ("lightning.pytorch.callbacks.LearningRateMonitor", "callbacks.mixture.MixtureMonitor",
        "lightning.pytorch.callbacks.EarlyStopping")


@pytest.fixture(scope="module")
def one_trial(tmp_path_factory, tokenizer_path, shards):
    """One real trial of the nano recipe plus a config that adds callbacks with ``callbacks+:``
    (a ModelCheckpoint, which a trial without checkpointing refuses, and an EarlyStopping it
    keeps),
    shrunk by dotted ``overrides``, as a child of a study's parent run."""
    folder = tmp_path_factory.mktemp("one-trial")
    adds = folder / "adds.yaml"
    adds.write_text("trainer:\n  callbacks+:\n"
                    "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                    "    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
                    "      init_args: {monitor: val/loss, patience: 10}\n")
    overrides = {key: value for key, value in mini_settings(
        folder, tokenizer_path, shards)["proxy"]["overrides"].items()
        if key != "trainer.callbacks"}  # the recipe's own callbacks, filtered by the trial
    proxy = Runs(configs=(str(ROOT / "config" / "nano.yaml"), str(adds)), tokens=4 * 32 * 4,
                 validations=2, keep_callbacks=KEPT, overrides=overrides)
    uri = f"sqlite:///{folder}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # MLflow puts artifacts under the working directory
        parent = TrackedRun.start(uri, EXPERIMENT, "one-study", tags={"windtunnel.role": "study"})
        study = optuna.create_study()
        finished = run_trial(
            study, study.ask(), name="one", proxy=proxy,
            shape=run_shape(resolved_recipe(proxy), proxy),
            distributions={"lr": optuna.distributions.FloatDistribution(0.005, 0.02, log=True)},
            objective="val/loss", diverge_factor=1.5, parent=parent, output=folder)
        client = MlflowClient(uri)
        run = client.get_run(finished.user_attrs["mlflow_run_id"])
        config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(folder)))
        yield {"trial": finished, "run": run, "parent": parent, "client": client,
               "config": yaml.safe_load(config.read_text()), "config_file": config,
               "folder": folder, "uri": uri}


def test_a_trial_keeps_only_keep_callbacks_of_every_config_file(one_trial):
    assert one_trial["trial"].state == TrialState.COMPLETE
    trained = [callback["class_path"] for callback in one_trial["config"]["trainer"]["callbacks"]]
    # The callbacks+ entries are filtered like the recipe's: EarlyStopping is listed,
    # ModelCheckpoint is not (kept, it would have stopped the trial: checkpointing is off).
    assert trained == list(KEPT)


def test_dotted_overrides_reach_the_trial(one_trial):
    params, config = one_trial["run"].data.params, one_trial["config"]
    assert params["data/val_batches_per_source"] == "1"  # config/nano.yaml says 4
    assert config["data"]["val_batches_per_source"] == 1
    assert config["model"]["architecture"]["hidden_size"] == 64
    assert params["trainer/max_steps"] == "4"  # the trial's budget over the overrides' 8


def test_a_trial_is_tracked_as_xm2_fit_tracks_the_same_config(one_trial):
    run, client = one_trial["run"], one_trial["client"]
    assert run.info.status == "FINISHED" and run.info.run_name == "one-trial-000"
    assert run.data.tags["mlflow.parentRunId"] == one_trial["parent"].run_id
    assert {"xm2.git_commit", "xm2.git_dirty"} <= set(run.data.tags)
    # xm2 fit of the trial's own config.yaml, as a user would rerun it, outside any study.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(one_trial["folder"])
        main(["fit", "--config", str(one_trial["config_file"]),
              "--trainer.logger.init_args.run_name=plain", "--trainer.logger.init_args.tags=null"])
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (plain,) = client.search_runs([experiment], "attributes.run_name = 'plain'")
    assert "mlflow.parentRunId" not in plain.data.tags
    study_params = {key for key in run.data.params if key.startswith("trial/")}
    assert study_params == {"trial/lr"}
    assert set(run.data.params) - study_params == set(plain.data.params)
    assert {key for key in plain.data.params if key.startswith(("data/", "trainer/"))}
    assert "config.yaml" in {artifact.path for artifact in client.list_artifacts(plain.info.run_id)}


# ----------------------------------------------------------------------------- real studies


@pytest.mark.slow
def test_a_miniature_study_end_to_end_with_a_planted_diverging_trial(
    tmp_path, tokenizer_path, shards, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts under the working directory
    settings = mini_settings(tmp_path, tokenizer_path, shards, enqueue=[{"lr": PLANTED_LR}])
    summary = windtunnel(**as_arguments(settings))

    trials = load(settings).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.COMPLETE, TrialState.COMPLETE]
    baseline, planted = trials[0], trials[1]
    # Trial 0 is the recipe's own values (config/nano.yaml), then the planted point.
    assert baseline.params == {"scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4,
                               "lr": 0.01}
    assert planted.params["lr"] == PLANTED_LR
    assert planted.user_attrs["failure"] == "diverged"
    assert "training loss" in planted.user_attrs["reason"]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value)
    assert summary["best"]["trial"] == best.number

    client = MlflowClient(settings["tracking_uri"])
    runs = children(settings)
    parent_id = summary["mlflow_parent_run_id"]
    assert {run.data.tags["mlflow.parentRunId"] for run in runs} == {parent_id}
    by_trial = {int(run.data.tags["optuna.trial"]): run for run in runs}
    assert sorted(by_trial) == [0, 1, 2, 3]
    assert by_trial[1].info.status == "FAILED"
    assert by_trial[1].data.tags["optuna.state"] == "FAIL"
    for trial in complete:
        run = by_trial[trial.number]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["objective"] == pytest.approx(trial.value)
        assert float(run.data.params["trial/lr"]) == pytest.approx(trial.params["lr"])
        assert float(run.data.params["optimizer/lr"]) == pytest.approx(trial.params["lr"])
        # Two validations, reported to the trial at optimizer steps 2 and 4.
        assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 2
        assert sorted(trial.intermediate_values) == [2, 4]

    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best/value"] == pytest.approx(best.value)
    assert parent.data.metrics["best/lr"] == pytest.approx(best.params["lr"])
    assert set(parent.data.metrics) >= {f"importance/{name}" for name in best.params}
    artifacts = {artifact.path for artifact in client.list_artifacts(parent_id)}
    assert artifacts >= {"best.yaml", "history.png", "slices.png", "importances.png",
                         "trials.csv", "summary.json"}
    output = tmp_path / "out" / "mini"
    for figure in ("history", "slices", "importances"):
        assert (output / f"{figure}.png").read_bytes().startswith(b"\x89PNG")

    # The best configuration is an xm2 fit config that runs as is.
    best_yaml = output / "best.yaml"
    config = yaml.safe_load(best_yaml.read_text())
    assert config["model"]["optimizer"]["lr"] == pytest.approx(best.params["lr"])
    assert config["model"]["architecture"]["dim_model_base"] == best.params["dim_model_base"]
    main(["fit", "--config", str(best_yaml)])
    (fitted,) = client.search_runs([client.get_experiment_by_name("xm2").experiment_id],
                                   "attributes.run_name = 'mini-best'")
    assert fitted.info.status == "FINISHED"
    assert float(fitted.data.params["optimizer/lr"]) == pytest.approx(best.params["lr"])
    assert fitted.data.metrics["val/loss"] < math.log(512)  # it learnt


@pytest.mark.slow
def test_two_workers_share_a_study_and_a_killed_one_resumes_without_repeating_trials(
    tmp_path, tokenizer_path, shards
):
    settings = mini_settings(tmp_path, tokenizer_path, shards, trials=4, baseline=False)
    MlflowClient(settings["tracking_uri"]).search_experiments()  # create the store once
    config = tmp_path / "study.yaml"
    first, second = worker(settings, config, tmp_path), worker(settings, config, tmp_path)
    deadline = time.time() + 240
    while True:  # kill the first worker inside a trial, once the study has a finished one
        assert first.poll() is None and time.time() < deadline, first.stdout.read()
        storage = tmp_path / "out" / "mini" / "journal.log"
        trials = load(settings).get_trials() if storage.exists() else []
        mine = [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in
                t.user_attrs and t.user_attrs.get("worker", "").endswith(f":{first.pid}")]
        if mine and any(t.state == TrialState.COMPLETE for t in trials):
            first.send_signal(signal.SIGKILL)
            first.wait()
            break
        time.sleep(0.05)
    interrupted = mine[0].number
    before = {t.number: t for t in load(settings).get_trials()}
    resumed = worker(settings, config, tmp_path)  # the same command again
    for process in (second, resumed):
        assert process.wait(timeout=300) == 0, process.stdout.read()

    trials = load(settings).get_trials()
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(counted) == 4
    for number, trial in before.items():  # finished trials are kept, not run again
        if trial.state == TrialState.COMPLETE:
            assert trials[number].state == TrialState.COMPLETE
            assert trials[number].value == trial.value
    assert trials[interrupted].state == TrialState.FAIL
    assert trials[interrupted].user_attrs["failure"] == f"worker {mine[0].user_attrs['worker']} gone"
    # Anything else failed is a trial refused as surplus in a race for the last place: never run.
    assert all(t.user_attrs.get("failure") == "surplus" and "mlflow_run_id" not in t.user_attrs
               for t in trials if t not in counted and t.number != interrupted)
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in counted}
    # The killed worker's finished trials stay; the others were run by the live workers.
    assert str(second.pid) in workers
    assert workers <= {str(first.pid), str(second.pid), str(resumed.pid)}
    assert len({tuple(sorted(t.params.items())) for t in trials if t.params}) == len(
        [t for t in trials if t.params])  # no point was proposed twice

    runs = {int(run.data.tags["optuna.trial"]): run for run in children(settings)}
    assert runs[interrupted].info.status == "KILLED"
    assert sorted(number for number, run in runs.items()
                  if run.data.tags.get("optuna.state") in ("COMPLETE", "PRUNED")) == sorted(
        t.number for t in counted)
    assert len({run.data.tags["mlflow.parentRunId"] for run in runs.values()}) == 1
    parent = MlflowClient(settings["tracking_uri"]).get_run(
        next(iter(runs.values())).data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert "best.yaml" in {a.path for a in MlflowClient(settings["tracking_uri"]).list_artifacts(
        parent.info.run_id)}
