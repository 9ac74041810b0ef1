"""The one way to run: a training or evaluation run built exactly as ``xm2 fit`` builds it.

    from xm2.run import run
    result = run("fit", ["config/nano.yaml"], ["--trainer.max_steps=60"])
    result.status, result.run_id, result.metrics["val/loss"], result.last_checkpoint

A run is config files (or mappings, written as YAML) composed in order plus command-line words,
parsed by ``xm2 fit``'s parser (LightningCLI/jsonargparse: its links, ``callbacks+:``, later
``--config`` wins), checked before anything is opened, trained with verified checkpoint files and
tracked by the recipe's logger. ``xm2 fit``/``validate``/``test`` are :func:`run` on their command
line; the wind tunnel, the µTransfer sweep, the decay study and the coordinate check build their
runs here too, so anything a user can write after ``xm2 fit`` works the same inside a study.

A study may add callback objects (``callbacks``), change the parsed config before anything is
built (``adjust``: e.g. drop the checkpointing of a measured trial) and run in-process or, with
``isolated=True``, as an ``xm2`` subprocess (a crash or a leak there cannot take the study down).
A run whose loss diverged is a result (``status == "diverged"``); any other failure raises. A
run stopped by SIGTERM (what a scheduler sends before it kills a job) or Ctrl-C saves a checkpoint,
prints the command that resumes from it and raises :class:`RunInterrupted`, which ends the process
with status 143 (SIGTERM) or 130 (SIGINT) unless a caller catches it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from xm2.errors import ConfigError, RunFailed, TrainingDiverged

RESULT_FILE_VARIABLE = "XM2_RUN_RESULT"
"""Set for an isolated run: the ``xm2`` subprocess writes its :class:`RunResult` there as JSON."""

Config = str | Path | Mapping[str, Any]
"""A config file (a path, or a preset shipped with xm2) or a mapping of settings."""


@dataclass
class RunResult:
    """What happened in a run."""

    status: Literal["finished", "diverged", "interrupted"]
    run_id: str | None
    """MLflow run of the xm2 logger (None without one)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The trainer's last value of every logged scalar (``val/loss``, ``train/loss``, ...)."""
    steps: int = 0
    """Optimizer steps done (less than trainer.max_steps if a callback stopped the run)."""
    last_checkpoint: str | None = None
    checkpoints: list[str] = field(default_factory=list)
    """Checkpoint files kept by the run's ModelCheckpoint, oldest first."""
    seconds: float = 0.0
    """Wall time of the whole run: parsing, instantiation, training, validation."""
    fit_seconds: float = 0.0
    """Wall time from the trainer's creation to the end (the rest is parsing and building)."""
    error: str | None = None
    """Why a diverged or interrupted run was stopped."""


class RunInterrupted(SystemExit):
    """A run stopped by a signal after saving the checkpoint it resumes from (``result``).

    A ``SystemExit`` whose status is 128 + the signal's number, as a shell reports a process the
    signal ended: 143 for SIGTERM, 130 for SIGINT (Ctrl-C). Uncaught, it ends the process with
    that status without a traceback, also inside a study, so a scheduler never takes an
    interrupted run for a finished one; ``result.last_checkpoint`` is the checkpoint to resume
    from (None if none could be saved).
    """

    def __init__(self, result: RunResult, signal_number: int) -> None:
        super().__init__(128 + signal_number)
        self.result = result


def config_arguments(configs: Sequence[Config]) -> list[str]:
    """``--config`` words for config files (shipped presets found by name) and mappings."""
    from xm2.presets import resolve_config

    words = []
    for config in configs:
        if isinstance(config, Mapping):
            words += ["--config", yaml.safe_dump(_plain(config), sort_keys=False)]
        else:
            words += ["--config", resolve_config(str(config))]
    return words


def override_args(settings: Mapping[str, Any]) -> list[str]:
    """Command-line words that set each dotted config path, as ``--model.optimizer.lr=0.02``
    would (strings as they are, anything else as JSON, which the parser reads as YAML)."""
    return [f"--{path}={value if isinstance(value, str) else json.dumps(_plain(value))}"
            for path, value in settings.items()]


def run(
    subcommand: Literal["fit", "validate", "test"] = "fit",
    configs: Sequence[Config] = (),
    args: Sequence[str] = (),
    *,
    callbacks: Sequence[Any] = (),
    adjust: Callable[[Any], None] | None = None,
    quiet: bool = False,
    isolated: bool = False,
    command: list[str] | None = None,
) -> RunResult:
    """Build and run ``xm2 <subcommand>`` from ``configs`` then ``args`` (command-line words).

    Args:
        subcommand: fit, validate or test.
        configs: Config files or mappings, composed in order (later wins), before ``args``.
        args: Further command-line words, exactly as after ``xm2 fit`` (``--config``, overrides).
        callbacks: Callback objects added to the recipe's (not with ``isolated``).
        adjust: Called with the parsed config of the subcommand before anything is built.
        quiet: Keep Lightning's per-run announcements out of the output (studies run many).
        isolated: Run as an ``xm2`` subprocess; its output is kept unless it fails.
        command: How the user started the process (the ``xm2`` command line only: it is then
            also the printed ``validate`` command, and a refused option ends the process).
    """
    words = [subcommand, *config_arguments(configs), *args]
    if isolated:
        if callbacks or adjust:
            raise ValueError("an isolated run takes no callback objects or adjust function")
        return _run_subprocess(words)
    return _run_here(words, list(callbacks), adjust, quiet, command)


def resolve(subcommand: Literal["fit", "validate", "test"] = "fit", configs: Sequence[Config] = (),
            args: Sequence[str] = ()) -> dict:
    """The complete config ``xm2 <subcommand>`` would run (parsed and linked, every default
    filled in), as a dict, without building or opening anything."""
    from xm2.lightning_cli import Xm2CLI

    class Parsed(Exception):
        def __init__(self, config: Any) -> None:
            self.config = config

    def stop(config: Any) -> None:
        raise Parsed(config)

    try:
        _build(Xm2CLI, [subcommand, *config_arguments(configs), *args], adjust=stop)
    except Parsed as parsed:
        return parsed.config.as_dict()
    raise AssertionError("the parser returned without reaching adjust")  # cannot happen


def config_text(subcommand: Literal["fit", "validate", "test"] = "fit",
                configs: Sequence[Config] = (), args: Sequence[str] = ()) -> str:
    """What ``xm2 <subcommand> ... --print_config`` prints: a complete config that runs as is."""
    import contextlib
    import io

    from xm2.lightning_cli import Xm2CLI

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        _build(Xm2CLI, [subcommand, *config_arguments(configs), *args, "--print_config"])
    return printed.getvalue()


def _build(cli_class: type, words: list[str], **kwargs: Any) -> Any:
    """The CLI object of ``words``: the one place that constructs it, for every run."""
    from xm2.data.datamodule import MixtureDataModule
    from xm2.lightning_cli import TrackConfig
    from xm2.module import Xm2Module

    with warnings.catch_warnings():
        # Lightning warns when a command line exists beside args; here args is the whole run.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        return cli_class(Xm2Module, MixtureDataModule, save_config_callback=TrackConfig,
                         save_config_kwargs={"save_to_log_dir": False},
                         auto_configure_optimizers=False, args=words[:], **kwargs)


def _run_here(words: list[str], callbacks: list, adjust: Callable[[Any], None] | None,
              quiet: bool, command: list[str] | None) -> RunResult:
    from xm2.lightning_cli import Xm2CLI

    quiet_lightning_noise()
    if quiet:
        quiet_lightning()
    started = time.perf_counter()
    built: dict[str, Any] = {}

    def on_trainer(trainer: Any) -> None:
        built.update(trainer=trainer, at=time.perf_counter())

    try:
        _build(Xm2CLI, words, trainer_defaults={"callbacks": callbacks} if callbacks else {},
               command=command or ["xm2", *words], adjust=adjust, on_trainer=on_trainer)
    except TrainingDiverged as error:
        return _outcome(built, "diverged", str(error), started)
    except (SystemExit, KeyboardInterrupt) as exit:
        # Lightning ends a run stopped by SIGTERM with SystemExit(None) and one stopped by
        # Ctrl-C with SystemExit(1); the interrupt callback knows which it was.
        interrupt = _interrupt_of(built.get("trainer"))
        if interrupt is not None and interrupt.signal is not None:
            result = _outcome(built, "interrupted", interrupt.summary, started)
            result.last_checkpoint = interrupt.checkpoint
            raise RunInterrupted(result, int(interrupt.signal)) from None
        if isinstance(exit, KeyboardInterrupt):
            raise
        # The parser has printed what is wrong with the words; a study gets an error it can
        # catch rather than the end of its process. `xm2 fit` itself exits as the parser says.
        if exit.code in (0, None) or command is not None:
            raise
        raise ConfigError(f"the run's configuration was refused (the parser's message is above): "
                          f"xm2 {shlex.join(words)}") from exit
    return _outcome(built, "finished", None, started)


def _interrupt_of(trainer: Any) -> Any:
    from xm2.lightning_cli import SaveOnInterrupt

    callbacks = getattr(trainer, "callbacks", None) or []
    return next((callback for callback in callbacks if isinstance(callback, SaveOnInterrupt)), None)


def _outcome(built: dict, status: str, error: str | None, started: float) -> RunResult:
    now = time.perf_counter()
    trainer = built.get("trainer")
    if trainer is None:  # diverged before the trainer existed: cannot happen, but say so
        return RunResult(status, None, seconds=now - started, error=error)
    checkpointing = trainer.checkpoint_callback
    kept = _kept_checkpoints(getattr(checkpointing, "dirpath", None))
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
               if getattr(value, "numel", lambda: 1)() == 1}
    return RunResult(
        status=status, run_id=_run_id(trainer.logger), metrics=metrics,
        steps=trainer.global_step,
        last_checkpoint=getattr(checkpointing, "last_model_path", None) or None,
        checkpoints=[str(path) for path in kept], seconds=now - started,
        fit_seconds=now - built["at"], error=error)


def _run_id(logger: Any) -> str | None:
    """The logger's MLflow run, without opening one for a run that never logged."""
    if logger is None or not getattr(logger, "opened", True):
        return None
    return getattr(logger, "run_id", None)


def _kept_checkpoints(folder: str | None) -> list[Path]:
    """The step checkpoints in ``folder`` (not ``last.ckpt``), by the step their record names."""
    from xm2.checkpoint import read_record

    if not folder or not Path(folder).is_dir():
        return []
    found = [path for path in Path(folder).glob("*.ckpt") if path.name != "last.ckpt"]
    steps = {path: (read_record(path) or {}).get("global_step") for path in found}
    return sorted(found, key=lambda path: (steps[path] is None, steps[path] or 0, path.name))


def _run_subprocess(words: list[str]) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="xm2-run-") as folder:
        result_file = Path(folder) / "result.json"
        completed = subprocess.run([sys.executable, "-m", "xm2.cli", *words],
                                   env={**os.environ, RESULT_FILE_VARIABLE: str(result_file)},
                                   capture_output=True, text=True)
        if result_file.is_file():
            result = RunResult(**json.loads(result_file.read_text()))
            if result.status == "interrupted":  # it exited 128 + the signal's number
                number = completed.returncode - 128
                raise RunInterrupted(result, number if number > 0 else signal.SIGTERM)
            return result
    lines = completed.stderr.strip().splitlines()
    said = [line for line in lines if line.startswith("xm2: error: ")]
    if said:  # the run's own one-line error says what to fix
        raise RunFailed(f"`xm2 {' '.join(words[:1])}` failed: {said[-1].removeprefix('xm2: error: ')}")
    raise RunFailed(f"`xm2 {' '.join(words[:1])}` exited with status {completed.returncode}:\n"
                    + "\n".join(lines[-40:]))


def main(words: list[str], command: list[str]) -> None:
    """``xm2 fit|validate|test ...``: :func:`run` on the command line; a divergence is an error,
    an interrupted run ends the process with 143 (SIGTERM) or 130 (SIGINT)."""
    try:
        result = run(words[0], args=_shipped_configs(words[1:]), command=command)
    except RunInterrupted as interrupted:
        _write_result(interrupted.result)
        raise
    _write_result(result)
    if result.status == "diverged":
        raise TrainingDiverged(result.error)


def _write_result(result: RunResult) -> None:
    if os.environ.get(RESULT_FILE_VARIABLE):
        Path(os.environ[RESULT_FILE_VARIABLE]).write_text(json.dumps(asdict(result)))


def _shipped_configs(words: list[str]) -> list[str]:
    """The words with each ``--config config/<preset>`` that is not a file here pointing at the
    preset shipped with xm2, so an installed xm2 runs its recipes from any folder."""
    from xm2.presets import resolve_config

    resolved, after_config = [], False
    for word in words:
        if after_config:
            word, after_config = resolve_config(word), False
        elif word in ("--config", "-c"):
            after_config = True
        elif word.startswith("--config="):
            word = "--config=" + resolve_config(word.removeprefix("--config="))
        resolved.append(word)
    return resolved


def quiet_lightning_noise() -> None:
    """Drop two messages that every run prints and no xm2 user can act on."""
    # Lightning's own pytree helper trips a torch deprecation on every validation loop.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # An advertisement for a hosted logger; xm2 logs to MLflow.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡 Tip:"))


def quiet_lightning() -> None:
    """Keep Lightning's per-run announcements (devices, hooks, summaries) out of study output.

    A study runs dozens of fits; only warnings and errors of each are worth printing.
    """
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _plain(value: Any) -> Any:
    """A mapping of settings as YAML can write it (tuples as lists)."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
