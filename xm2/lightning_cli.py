"""``Xm2CLI``: LightningCLI with xm2's checks, exact resume, decay branches and tracking.

Only :mod:`xm2.run` builds it: ``xm2 fit``/``validate``/``test`` and every study go through
``xm2.run.run``. Imported only by commands that train or evaluate (see xm2.cli), because
Lightning and torch take seconds to import and ``xm2 --help`` and the data tools need neither.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from xm2 import preflight, resume
from xm2.checkpoint import (
    VerifiedCheckpointIO,
    check_writable,
    find_last_checkpoint,
    load_checkpoint_file,
    sharded_metadata,
)
from xm2.data.tokenizer import default_tokenizer_path, tokenizer_mismatch
from xm2.errors import CheckpointError
from xm2.tracking import lineage
from xm2.tracking.record import record_text


class TrackConfig(SaveConfigCallback):
    """Logs the fully resolved config to the experiment tracker as ``config.yaml``."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        record_text(trainer, self.parser.dump(self.config, skip_none=False), "config.yaml")


class Xm2CLI(LightningCLI):
    """LightningCLI whose ``--ckpt_path`` resumes exactly and whose ``--branch_from`` branches.

    Lightning's own handling of ``--ckpt_path`` replaces the command line's model settings with
    the checkpoint's, silently; here every difference is applied or refused (see xm2.resume).
    ``command`` is how this process was started (program and arguments), for the printed hint;
    ``adjust`` changes the parsed config before anything is built (a study shortening a recipe);
    ``on_trainer`` is called with the trainer as soon as it exists (the run API reads its outcome
    from it, also when the run fails).
    """

    def __init__(self, *args: Any, command: list[str] | None = None,
                 adjust: Callable[[Any], None] | None = None,
                 on_trainer: Callable[[Any], None] | None = None, **kwargs: Any) -> None:
        self.command, self.adjust, self.on_trainer = command, adjust, on_trainer
        self.resumed_record: dict | None = None
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
        if self.adjust is not None:
            self.adjust(config)
        preflight.check_trainer(config.trainer)
        for note in preflight.replaced_callbacks(config.get("config") or []):
            print(note, file=sys.stderr)
        for entry in lineage.mlflow_logger_configs(config.trainer.logger):
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
                                            *lineage.run_name_and_experiment(config.trainer.logger)))
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
            lineage.start_branch_run(config.trainer.logger, record, plan.source_step,
                                     plan.source_tokens, plan.decay_steps)
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
            lineage.continue_run(config.trainer.logger, record)
            self.resumed_record = record
        elif mode == "evaluate":
            lineage.tag_evaluation_run(config.trainer.logger, record, path, subcommand)
        config.ckpt_path = path

    def _current_settings(self, subcommand: str) -> dict:
        config = self.config[subcommand]
        dumped = yaml.safe_load(self.parser.dump(self.config,
                                                 skip_link_targets=False))[subcommand]
        trainer = config.trainer
        settings = {
            "max_steps": trainer.max_steps,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "precision": unified_precision(trainer.precision),
            "gradient_clip_val": trainer.gradient_clip_val,
            "seed": config.get("seed_everything"),
        }
        if isinstance(trainer.devices, int) and isinstance(trainer.num_nodes, int):
            settings["world_size"] = trainer.devices * trainer.num_nodes
        return resume.current_settings(dumped["model"], dumped["data"], settings)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        if self.on_trainer is not None:
            self.on_trainer(trainer)
        return trainer

    def before_fit(self) -> None:
        # The module checks this in its setup, after Lightning has opened the MLflow run; here
        # a mistake stops the command before there is a run to leave FAILED.
        self.model.schedule.check_run_length(self.trainer.max_steps)
        self._prepare_run("fit")
        if self.resumed_record is not None:
            for logger in self._xm2_loggers():
                logger.restore_last_step_metrics(self.resumed_record)
        checkpointing = self.trainer.checkpoint_callback
        folder = (checkpointing.dirpath if isinstance(checkpointing, ModelCheckpoint)
                  and checkpointing.dirpath else self.trainer.default_root_dir)
        check_writable(folder)

    def before_validate(self) -> None:
        self._prepare_run("validate")

    def before_test(self) -> None:
        self._prepare_run("test")

    def _prepare_run(self, subcommand: str) -> None:
        # Atomic, verified checkpoint files whatever the strategy (it saves through checkpoint_io).
        self.trainer.strategy.checkpoint_io = VerifiedCheckpointIO()
        data_keys = set(self.datamodule.hparams_initial) if self.datamodule else set()
        for logger in self._xm2_loggers():
            logger.keep_backlog_in(Path(self.trainer.default_root_dir) / "tracking")
            logger.label_params(data_keys, run_params(self.config[subcommand]))

    def _xm2_loggers(self) -> list:
        from xm2.tracking.logger import Xm2MLFlowLogger

        return [logger for logger in self.trainer.loggers if isinstance(logger, Xm2MLFlowLogger)]

    def _report_unsent(self) -> None:
        for logger in self._xm2_loggers():
            logger.report_unsent()

    def after_fit(self) -> None:
        self._report_unsent()
        checkpoint = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and checkpoint and checkpoint.last_model_path:
            print(f"\nLast checkpoint: {checkpoint.last_model_path}\nEvaluate it with: "
                  f"{validate_command(self.command, checkpoint.last_model_path)}")

    def after_validate(self) -> None:
        self._report_unsent()

    def after_test(self) -> None:
        self._report_unsent()


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


# Lightning's legacy precision names and the ones it records (``Trainer(precision=16).precision``
# is "16-mixed"); tests/test_cli.py checks this table against Lightning itself.
_LEGACY_PRECISION = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


def unified_precision(precision: Any) -> str:
    """Lightning's own name for a precision setting (16 -> "16-mixed"), as the trainer records it."""
    return _LEGACY_PRECISION.get(str(precision), str(precision))


def _check_tokenizer(data_config: Namespace, record: dict, path: str) -> None:
    tokenizer = data_config.tokenizer_path or default_tokenizer_path(data_config.vocab_size)
    problem = tokenizer_mismatch(record.get("tokenizer_sha256"), tokenizer)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}")
