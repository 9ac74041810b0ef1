"""The Lightning half of the ``xm2`` command: ``fit``/``validate``/``test`` through LightningCLI.

Imported only by commands that train or evaluate (see xm2.cli), because Lightning and torch take
seconds to import and ``xm2 --help`` and the data tools need neither.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from xm2 import preflight, resume, tracking
from xm2.checkpoint import (
    CheckpointError,
    VerifiedCheckpointIO,
    check_writable,
    find_last_checkpoint,
    load_checkpoint_file,
    sharded_metadata,
)
from xm2.data.datamodule import MixtureDataModule
from xm2.data.tokenizer import default_tokenizer_path, tokenizer_mismatch
from xm2.module import Xm2Module


class TrackConfig(SaveConfigCallback):
    """Logs the fully resolved config to the experiment tracker as ``config.yaml``."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False)
        logger = trainer.logger
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, config, "config.yaml")
        elif logger is not None:
            logger.log_hyperparams({"config": config})


class Xm2CLI(LightningCLI):
    """LightningCLI whose ``--ckpt_path`` resumes exactly and whose ``--branch_from`` branches.

    Lightning's own handling of ``--ckpt_path`` replaces the command line's model settings with
    the checkpoint's, silently; here every difference is applied or refused (see xm2.resume).
    ``command`` is how this process was started (program and arguments), for the printed hint.
    """

    def __init__(self, *args: Any, command: list[str] | None = None, **kwargs: Any) -> None:
        self.command = command
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # `predict` needs a predict dataloader and a predict step, which a language-model
        # pretraining recipe does not have: it is not offered rather than offered and failing.
        return {name: skipped for name, skipped in LightningCLI.subcommands().items()
                if name != "predict"}

    def before_instantiate_classes(self) -> None:
        """Check what the configuration alone can tell before any class, store or run exists."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        preflight.check_trainer(config.trainer)
        for note in preflight.replaced_callbacks(config.get("config") or []):
            print(note, file=sys.stderr)
        for entry in _mlflow_loggers(config.trainer.logger):
            preflight.check_tracking_uri(entry.init_args.get("tracking_uri"))

    def add_arguments_to_parser(self, parser) -> None:
        # One fact, one home: these data settings follow from the model and its schedule.
        parser.link_arguments("model.schedule.decay_start_step", "data.decay_start_step")
        parser.link_arguments("model.architecture.vocab_size", "data.vocab_size")
        parser.link_arguments("model.architecture.max_seq_len", "data.seq_len")
        # On every subcommand, so that a config printed by `fit` also runs `validate`.
        parser.add_argument(
            "--branch_from", type=str | None, default=None,
            help="fit: start a decay branch from this stable-phase checkpoint: weights, optimizer "
                 "and data position restored, the LR decaying from its value at that step, the "
                 "decay mixture from that step, in a new MLflow run tagged with its parent.")
        parser.add_argument("--branch_decay_steps", type=int | None, default=None,
                            help="fit: length of the branch's decay in optimizer steps.")
        parser.add_argument("--branch_decay_tokens", type=int | None, default=None,
                            help="fit: length of the branch's decay in training tokens.")

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path``/``--branch_from`` and check the checkpoint against the config."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        branch_from = config.get("branch_from")
        if branch_from and subcommand != "fit":
            raise CheckpointError(f"--branch_from starts a training run; it is for `xm2 fit`, "
                                  f"not `xm2 {subcommand}`")
        if branch_from and config.get("ckpt_path"):
            raise CheckpointError("give --ckpt_path (resume) or --branch_from (branch), not both")
        path = branch_from or config.get("ckpt_path")
        if not path:
            return
        if path == "last":
            path = str(find_last_checkpoint(config.trainer.default_root_dir or ".",
                                            *_run_name_and_experiment(config.trainer.logger)))
            print(f"Resuming from the run's last checkpoint: {path}", file=sys.stderr)
        elif not Path(path).exists():
            raise CheckpointError(f"checkpoint {path} does not exist; give a checkpoint file or "
                                  "'last' (the newest checkpoint of this run)")
        # A sharded checkpoint is a folder; its settings are in its metadata file.
        checkpoint = (sharded_metadata(path) if Path(path).is_dir()
                      else load_checkpoint_file(path, mmap=True))
        mode = "branch" if branch_from else "resume" if subcommand == "fit" else "evaluate"
        record = (checkpoint.get("xm2") or {}).get("record") or {}
        imported = record.get("imported_from")  # `xm2 import-hf`: weights, no training state
        if imported and mode == "resume":
            raise CheckpointError(f"checkpoint {path} was imported from {imported} and has no "
                                  "training state to resume; start a decay branch from it with "
                                  f"--branch_from {path} --branch_decay_steps N")
        if mode == "branch":
            plan = resume.plan_branch(checkpoint, path, config.get("branch_decay_steps"),
                                      config.get("branch_decay_tokens"))
            config.model.schedule.decay_start_step = plan.source_step
            config.data.decay_start_step = plan.source_step
            config.trainer.max_steps = plan.max_steps
            _start_branch_run(config.trainer.logger, record, plan)
            print(f"Branching from step {plan.source_step} of {path}: decay for {plan.decay_steps} "
                  f"steps to step {plan.max_steps}", file=sys.stderr)
            if imported:
                print(f"{path} is imported and has no optimizer state: AdamW starts fresh (zero "
                      "moments) at the branch's learning rate", file=sys.stderr)
        _check_tokenizer(config.data, record, path)
        # An imported model's optimizer, schedule and data were never xm2 settings: only its
        # architecture binds what runs from it.
        comparison = resume.compare(resume.checkpoint_settings(checkpoint),
                                    self._current_settings(subcommand),
                                    "evaluate" if imported else mode)
        if comparison.refused:
            raise CheckpointError(resume.refusal_message(path, mode, comparison.refused))
        for line in [] if imported else comparison.announce():
            print(f"Applied: {line}", file=sys.stderr)
        if mode == "resume":
            self.resumed_run_id = _continue_run(config.trainer.logger, record)
            self.resumed_record = record
        elif mode == "evaluate":
            _tag_evaluation_run(config.trainer.logger, record, path, subcommand)
        config.ckpt_path = path

    def _current_settings(self, subcommand: str) -> dict:
        config = self.config[subcommand]
        dumped = yaml.safe_load(self.parser.dump(self.config,
                                                 skip_link_targets=False))[subcommand]
        trainer = config.trainer
        settings = {
            "max_steps": trainer.max_steps,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "precision": _unified_precision(trainer.precision),
            "gradient_clip_val": trainer.gradient_clip_val,
            "seed": config.get("seed_everything"),
        }
        if isinstance(trainer.devices, int) and isinstance(trainer.num_nodes, int):
            settings["world_size"] = trainer.devices * trainer.num_nodes
        return resume.current_settings(dumped["model"], dumped["data"], settings)

    def before_fit(self) -> None:
        # The module checks this in its setup, after Lightning has opened the MLflow run; here
        # a mistake stops the command before there is a run to leave FAILED.
        self.model.schedule.check_run_length(self.trainer.max_steps)
        self._guard_the_run()
        logger = self.trainer.logger
        if getattr(self, "resumed_run_id", None) and isinstance(logger, MLFlowLogger):
            # A killed run was left RUNNING or FAILED; it runs again now, and ends FINISHED.
            logger.experiment.update_run(self.resumed_run_id, status="RUNNING")
            tracking.log_params_once(logger, self.resumed_run_id)
            tracking.log_missing_step_metrics(logger, self.resumed_run_id, self.resumed_record)
        checkpointing = self.trainer.checkpoint_callback
        folder = (checkpointing.dirpath if isinstance(checkpointing, ModelCheckpoint)
                  and checkpointing.dirpath else self.trainer.default_root_dir)
        check_writable(folder)
        self._label_params("fit")

    def before_validate(self) -> None:
        self._guard_the_run()
        self._label_params("validate")

    def before_test(self) -> None:
        self._guard_the_run()
        self._label_params("test")

    def _label_params(self, subcommand: str) -> None:
        """Log the run's parameters under one prefix per source and tag the code version.

        Lightning logs the model's and the data module's hyperparameters in one flat namespace
        (so ``batch_size`` could be either) plus LightningCLI's ``_instantiator``; here the data
        module's are ``data/...``, the trainer's settings ``trainer/...`` are added, the
        model's keep their groups (``architecture/``, ``optimizer/``, ``schedule/``, ...), and
        the run is tagged with the git commit and whether the working tree had changes.
        """
        logger = self.trainer.logger
        if not isinstance(logger, MLFlowLogger):
            return
        data_keys = set(self.datamodule.hparams_initial) if self.datamodule else set()
        trainer_params = run_params(self.config[subcommand])
        log_next = logger.log_hyperparams

        def log_hyperparams(params: Any, *args: Any, **kwargs: Any) -> None:
            params = dict(params) if isinstance(params, dict) else vars(params)
            labelled = {(f"data/{key}" if key in data_keys else key): value
                        for key, value in params.items() if not key.startswith("_")}
            log_next({**labelled, **trainer_params}, *args, **kwargs)
            if rank_zero_only.rank != 0:  # the logger writes from the first rank only
                return
            for tag, value in git_tags().items():
                logger.experiment.set_tag(logger.run_id, tag, value)

        logger.log_hyperparams = log_hyperparams

    def _guard_the_run(self) -> None:
        # Atomic, verified checkpoint files whatever the strategy (it saves through checkpoint_io).
        self.trainer.strategy.checkpoint_io = VerifiedCheckpointIO()
        self.tracking_guard = tracking.guard_logger(
            self.trainer.logger, Path(self.trainer.default_root_dir) / "tracking")

    def after_fit(self) -> None:
        if self.tracking_guard:
            self.tracking_guard.report_unsent()
        checkpoint = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and checkpoint and checkpoint.last_model_path:
            print(f"\nLast checkpoint: {checkpoint.last_model_path}\nEvaluate it with: "
                  f"{validate_command(self.command, checkpoint.last_model_path)}")

    def after_validate(self) -> None:
        if self.tracking_guard:
            self.tracking_guard.report_unsent()


# Trainer settings logged as ``trainer/<name>`` parameters of every run.
TRAINER_PARAMS = ("max_steps", "precision", "accelerator", "devices", "num_nodes", "strategy",
                  "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
                  "val_check_interval", "limit_val_batches", "deterministic")


def run_params(config: Namespace) -> dict[str, str]:
    """The trainer settings and seed of a subcommand's config, as MLflow parameters."""
    trainer = config.trainer
    params = {}
    for name in TRAINER_PARAMS:
        value = trainer.get(name)
        if isinstance(value, Namespace):  # a class given by class_path, e.g. a strategy
            value = str(value.get("class_path")).rsplit(".", 1)[-1]
        params[f"trainer/{name}"] = str(value)
    params["seed_everything"] = str(config.get("seed_everything"))
    return params


def git_tags() -> dict[str, str]:
    """``xm2.git_commit`` and ``xm2.git_dirty`` of the xm2 code that runs ("unknown" outside git)."""
    folder = Path(__file__).resolve().parents[1]

    def git(*words: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(folder), *words], capture_output=True,
                                    text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"xm2.git_commit": "unknown", "xm2.git_dirty": "unknown"}
    # Untracked files do not change what runs; modified tracked files do.
    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"xm2.git_commit": commit,
            "xm2.git_dirty": "unknown" if changes is None else str(bool(changes)).lower()}


def validate_command(command: list[str] | None, checkpoint: str) -> str:
    """The ``validate`` command line for ``checkpoint`` of a ``fit`` started as ``command``.

    It starts the program the way this process was started (``.venv/bin/xm2`` or
    ``python -m xm2.cli``) and keeps the configs and overrides given to ``fit``, less the
    options that only concern starting a training run.
    """
    if not command:
        program, words = ["xm2"], ["fit"]
    else:
        program, words = command[:1], command[1:]
        if Path(program[0]).name in ("cli.py", "__main__.py"):
            program = [sys.executable, "-m", "xm2.cli"]
    fit_only = {"--ckpt_path", "--branch_from", "--branch_decay_steps", "--branch_decay_tokens"}
    kept, skip_value = [], False
    for word in words[words.index("fit") + 1:] if "fit" in words else words:
        if skip_value:
            skip_value = False
            continue
        name = word.split("=", 1)[0]
        if name in fit_only:
            skip_value = "=" not in word
            continue
        kept.append(word)
    return shlex.join([*program, "validate", *kept, "--ckpt_path", str(checkpoint)])


def run(argv: list[str] | None = None) -> None:
    """``xm2 fit|validate|test ...``: the Lightning commands."""
    quiet_lightning_noise()
    Xm2CLI(
        Xm2Module,
        MixtureDataModule,
        save_config_callback=TrackConfig,
        save_config_kwargs={"save_to_log_dir": False},
        auto_configure_optimizers=False,
        args=argv,
        command=[sys.argv[0], *sys.argv[1:]] if argv is None else ["xm2", *argv],
    )


def _unified_precision(precision: Any) -> str:
    """Lightning's own name for a precision setting (16 -> "16-mixed"), as the trainer records it."""
    from lightning.fabric.connector import _convert_precision_to_unified_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy-name advice is Lightning's to give, later
        try:
            return str(_convert_precision_to_unified_args(precision))
        except (ValueError, TypeError):
            return str(precision)


def _mlflow_loggers(logger_config: Any) -> list[Namespace]:
    """The MLFlowLogger entries of a ``trainer.logger`` config (one logger or a list)."""
    entries = logger_config if isinstance(logger_config, list) else [logger_config]
    return [entry for entry in entries if isinstance(entry, Namespace)
            and str(entry.get("class_path", "")).endswith("MLFlowLogger")]


def _run_name_and_experiment(logger_config: Any) -> tuple[str | None, str | None]:
    for entry in _mlflow_loggers(logger_config):
        return entry.init_args.get("run_name"), entry.init_args.get("experiment_name")
    return None, None


def _continue_run(logger_config: Any, record: dict) -> str | None:
    """Point the MLflow logger at the checkpoint's run, so the resumed run is the same run."""
    resumed = None
    for entry in _mlflow_loggers(logger_config):
        same_store = record.get("tracking_uri") in (None, entry.init_args.get("tracking_uri"))
        if record.get("run_id") and same_store:
            entry.init_args.run_id = record["run_id"]
            resumed = record["run_id"]
        elif record.get("run_id"):
            print(f"The checkpoint's MLflow run {record['run_id']} is in another store "
                  f"({record.get('tracking_uri')}); this resume opens a new run.", file=sys.stderr)
    return resumed


def _start_branch_run(logger_config: Any, record: dict, plan: resume.BranchPlan) -> None:
    for entry in _mlflow_loggers(logger_config):
        args = entry.init_args
        parent_name = record.get("run_name") or "run"
        if args.get("run_name") in (None, record.get("run_name")):
            args.run_name = f"{parent_name}-decay-from-{plan.source_step}"
        args.run_id = None
        tags = {tracking.SOURCE_STEP_TAG: str(plan.source_step),
                tracking.SOURCE_TOKENS_TAG: str(plan.source_tokens or ""),
                tracking.DECAY_STEPS_TAG: str(plan.decay_steps)}
        if record.get("run_id") and record.get("tracking_uri") in (None, args.get("tracking_uri")):
            # The parent tag also nests the branch under its stable run in the MLflow UI.
            tags |= {tracking.PARENT_RUN_TAG: record["run_id"], "mlflow.parentRunId": record["run_id"]}
        args.tags = {**(args.get("tags") or {}), **tags}


def _tag_evaluation_run(logger_config: Any, record: dict, path: str, subcommand: str) -> None:
    for entry in _mlflow_loggers(logger_config):
        args = entry.init_args
        args.run_id = None
        if args.get("run_name") in (None, record.get("run_name")):
            args.run_name = f"{record.get('run_name') or 'run'}-{subcommand}-step{record.get('global_step')}"
        tags = {"xm2.checkpoint": str(path), "xm2.checkpoint_step": str(record.get("global_step"))}
        if record.get("run_id"):
            tags["xm2.checkpoint_run_id"] = record["run_id"]
        args.tags = {**(args.get("tags") or {}), **tags}


def _check_tokenizer(data_config: Namespace, record: dict, path: str) -> None:
    tokenizer = data_config.tokenizer_path or default_tokenizer_path(data_config.vocab_size)
    problem = tokenizer_mismatch(record.get("tokenizer_sha256"), tokenizer)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}")


def quiet_lightning_noise() -> None:
    """Drop two messages that every run prints and no xm2 user can act on."""
    # Lightning's own pytree helper trips a torch deprecation on every validation loop.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # An advertisement for a hosted logger; xm2 logs to MLflow.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡 Tip:"))
