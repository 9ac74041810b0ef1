"""The µP coordinate check, run for real (``xm2 fit`` runs): flat in width under µP, growing under SP."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from torch.utils.data import DataLoader

from callbacks.coord_check import CoordCheck
from tests.conftest import CORPUS
from xm2.config import ModelConfig
from xm2.model import Decoder
from xm2.module import Xm2Module
from xm2.optimizer import OptimizerConfig
from xm2.schedule import WSDSchedule
from xm2.studies.coord_check import ActivationRecorder, activation_names, coord_check, run_config

WIDTHS = (64, 256, 1024)  # a 16× width range
STEPS = 3
SEEDS = 2
MODULES = ["embedding", *(f"layer{i}.{kind}" for i in range(2)
                          for kind in ("attention", "mlp", "residual")), "final_norm", "logits"]


@pytest.fixture(scope="module")
def coord_run(tokenizer_path, tmp_path_factory):
    """One real `coord_check` of both parametrizations: 12 `xm2 fit` runs, their MLflow store,
    artefacts and shards in a tmp folder."""
    directory = tmp_path_factory.mktemp("coord_check")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)  # MLflow's default artifact root is ./mlruns
        factors = coord_check(
            widths=WIDTHS, steps=STEPS, seeds=SEEDS, num_layers=2, seq_len=32, batch_size=4,
            corpus_dir=str(CORPUS), tokenizer_path=str(tokenizer_path), output_dir="plots",
            tracking_uri=f"sqlite:///{directory}/mlflow.db",
        )
    return factors, directory


def test_recorder_sees_each_activation_where_mup_scales_it():
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=80, num_layers=2,
                         num_heads=2, max_seq_len=8, dim_model_base=8, scale_emb=5.0)
    model = Decoder(config)
    tokens = torch.randint(0, 64, (2, 8))
    with torch.no_grad(), ActivationRecorder(model) as recorder:
        logits = model(tokens)
        attention = model.layers[0].self_attn(model.layers[0].input_layernorm(
            model.embed_tokens(tokens) * 5.0), model.rope_cos, model.rope_sin)
    sizes = recorder.sizes()
    assert list(sizes) == MODULES == activation_names(2)
    assert sizes["embedding"] == pytest.approx(
        (model.embed_tokens(tokens) * 5.0).abs().mean().item())
    assert sizes["layer0.attention"] == pytest.approx(
        (config.residual_scale * attention).abs().mean().item(), rel=1e-5)
    assert sizes["logits"] == pytest.approx(logits.abs().mean().item())


@pytest.mark.slow
def test_mup_keeps_every_activation_width_independent_after_updates(coord_run):
    factors, _ = coord_run
    # Measured (2 layers, seeds 0-1, widths 64-1024, streamed prose batches): at t=3 every
    # module is within 1.00-1.38 and the logits 1.19. At init the logits shrink 3.8× (≈ √16:
    # tied readout / m), then settle (3.3× at t=1, 1.95× at t=2), so they are checked at the
    # last step only; every other module stays below 1.4 at every step, init included.
    at_last_step = {module: factors[("mup", STEPS, module)] for module in MODULES}
    assert max(at_last_step.values()) < 2.0, at_last_step
    for step in range(STEPS + 1):
        for module in MODULES[:-1]:
            assert factors[("mup", step, module)] < 2.0, (step, module)


@pytest.mark.slow
def test_sp_is_caught_growing_with_width(coord_run):
    factors, _ = coord_run
    # Measured at t=3: attention outputs grow 18-35×, MLP outputs 48-63×, residual streams
    # 32-34× over the 16× width range (the µP runs of the same batches stay below 1.4). xm2's SP
    # keeps init_std at every width (m fixed at 1), so they grow as much at init already (28-81×).
    for module in MODULES:
        if module.endswith((".attention", ".mlp", ".residual")):
            assert factors[("sp", STEPS, module)] > 10.0, module


@pytest.mark.slow
def test_command_writes_plots_tables_and_an_mlflow_run(coord_run):
    factors, directory = coord_run
    tables = {}
    for parametrization in ("mup", "sp"):
        plot = directory / "plots" / f"coord_check_{parametrization}.png"
        table = directory / "plots" / f"coord_check_{parametrization}.csv"
        assert plot.stat().st_size > 10_000
        rows = table.read_text().splitlines()
        assert rows[0] == "parametrization,width,step,module,mean_abs"
        assert len(rows) == 1 + len(WIDTHS) * (STEPS + 1) * len(MODULES)
        tables |= {tuple(row.split(",")[:4]): float(row.split(",")[4]) for row in rows[1:]}
    client = MlflowClient(f"sqlite:///{directory}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("xm2-coord-check").experiment_id])
    (run,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert run.info.status == "FINISHED"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
        "coord_check_mup.csv", "coord_check_mup.png", "coord_check_sp.csv", "coord_check_sp.png"]
    history = client.get_metric_history(run.info.run_id, "growth/sp/logits")
    assert {m.step: m.value for m in history} == pytest.approx(
        {step: factors[("sp", step, "logits")] for step in range(STEPS + 1)})

    # One `xm2 fit` run per (parametrization, width, seed), a child of the study's run, logged
    # as xm2 fit logs a run; the tables are the seed means of the sizes its CoordCheck logged.
    children = [child for child in runs if child is not run]
    assert sorted(child.info.run_name for child in children) == sorted(
        f"{p}-w{w}-s{s}" for p in ("mup", "sp") for w in WIDTHS for s in range(SEEDS))
    for child in children:
        params, tags = child.data.params, child.data.tags
        assert child.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == run.info.run_id
        assert params["architecture/hidden_size"] == tags["coord_check.width"]
        assert params["architecture/use_mup"] == str(tags["coord_check.parametrization"] == "mup")
        assert params["trainer/max_steps"] == str(STEPS + 1)
        assert params["trainer/precision"] == "32-true"
        assert params["seed_everything"] == params["data/seed"] == tags["coord_check.seed"]
        assert "xm2.git_commit" in tags
    for parametrization, width, step, module in [("mup", 256, 2, "layer1.mlp"),
                                                 ("sp", 1024, STEPS, "logits")]:
        logged = [point.value for child in children
                  if child.info.run_name.startswith(f"{parametrization}-w{width}-")
                  for point in client.get_metric_history(child.info.run_id, f"coord/{module}")
                  if point.step == step]
        assert len(logged) == SEEDS
        assert tables[(parametrization, str(width), str(step), module)] == pytest.approx(
            sum(logged) / SEEDS)


def test_each_run_trains_at_a_constant_learning_rate_and_records_every_step():
    config = run_config(parametrization="mup", width=128, seed=1, steps=STEPS,
                        architecture=dict(base_width=64, num_layers=2, vocab_size=512, seq_len=32),
                        optimizer=OptimizerConfig(), data={}, accelerator="cpu",
                        root_dir="runs")
    schedule = WSDSchedule(**config["model"]["schedule"])
    max_steps = config["trainer"]["max_steps"]
    schedule.check_run_length(max_steps)
    # Every update, the unrecorded last one included, runs at the peak learning rate.
    assert [schedule.lr_factor(step, max_steps) for step in range(max_steps)] == [1.0] * max_steps
    assert max_steps == STEPS + 1
    assert config["trainer"]["callbacks"] == [
        {"class_path": "callbacks.coord_check.CoordCheck", "init_args": {"every_n_steps": 1}}]
    assert config["trainer"]["gradient_clip_val"] is None


def test_callback_logs_coordinate_sizes_during_fit(tmp_path):
    architecture = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160,
                               num_layers=2, num_heads=1, max_seq_len=16, dim_model_base=64)
    module = Xm2Module(architecture, schedule=WSDSchedule(warmup_steps=1, decay_start_step=4))
    tokens = torch.randint(0, 512, (12, 17), generator=torch.Generator().manual_seed(0))
    batches = DataLoader([{"tokens": row} for row in tokens], batch_size=2)
    logger = MLFlowLogger("coord", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                          artifact_location=str(tmp_path / "mlruns"))
    trainer = L.Trainer(max_steps=6, logger=logger, callbacks=[CoordCheck(every_n_steps=2)],
                        log_every_n_steps=5, accelerator="cpu", devices=1,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, batches)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for name in MODULES:
        history = client.get_metric_history(logger.run_id, f"coord/{name}")
        # Step 0 is there although log_every_n_steps=5: the callback logs on its own schedule.
        assert sorted(m.step for m in history) == [0, 2, 4], name
        assert all(math.isfinite(m.value) and m.value > 0 for m in history), name
