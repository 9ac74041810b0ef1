"""``Xm2CLI``: LightningCLI with xm2's checks, exact resume, decay branches and tracking.

Only :mod:`xm2.run` builds it: ``xm2 fit``/``validate``/``test`` and every study go through
``xm2.run.run``. Imported only by commands that train or evaluate (see xm2.cli), because
Lightning and torch take seconds to import and ``xm2 --help`` and the data tools need neither.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from xm2 import preflight, resume
from xm2.checkpoint import (
    VerifiedCheckpointIO,
    check_writable,
    find_last_checkpoint,
    load_checkpoint_file,
    read_record,
    sharded_metadata,
)
from xm2.data.tokenizer import default_tokenizer_path, tokenizer_mismatch
from xm2.errors import CheckpointError, Xm2Error
from xm2.tracking import lineage
from xm2.tracking.record import record_text


class TrackConfig(SaveConfigCallback):
    """Logs the fully resolved config to the experiment tracker as ``config.yaml``."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        record_text(trainer, self.parser.dump(self.config, skip_none=False), "config.yaml")


class SaveOnInterrupt(Callback):
    """SIGTERM (what a scheduler sends before it kills a job) or Ctrl-C during training: the
    optimizer step in flight finishes, a checkpoint of it is saved where the run's ModelCheckpoint
    keeps them, the exact command that resumes from it is printed, and the run ends with status
    128 + the signal's number (143, 130: xm2.run.RunInterrupted). Installed by :class:`Xm2CLI`.

    Lightning's own SIGTERM handling stops with ``SIGTERMException``, a ``SystemExit`` whose
    status is 0, so ``fit && evaluate`` would carry on; and its handler broadcasts to the other
    ranks from inside the signal handler, which can pair with another collective and hang a
    multi-process run. During training this callback's handler only notes the signal; at the end
    of each optimizer step the ranks agree (one small all-reduce) whether any was signalled, save
    together and stop together, in the state a ModelCheckpoint saves, so the resume is exact. A
    second Ctrl-C stops at once, without a checkpoint. Outside the training loop (sanity check,
    validate, test) Lightning's handling stays, and the run still ends with the signal's status.
    """

    def __init__(self, command: list[str] | None = None) -> None:
        self.command = command
        self.signal: signal.Signals | None = None
        """The signal that stopped the run; None if none did."""
        self.step: int | None = None
        self.checkpoint: str | None = None
        """The checkpoint to resume from, saved at the interrupted step; None if none was."""
        self.summary: str | None = None
        self._noted: int = 0  # the number of a signal this process received during training
        self._previous: dict[int, Any] = {}
        self._speak = False  # this is rank 0
        self._step_before = -1
        self._reported = False

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning has installed its SIGTERM handler by now, and restores what was there before
        # it when the run ends; these replace it while the training loop runs.
        if threading.current_thread() is threading.main_thread():
            self._speak = trainer.is_global_zero
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._note)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def _note(self, number: int, frame: Any) -> None:
        # No print here: the main thread may be inside a print to the same stream.
        self._noted = max(self._noted, number)
        if number == signal.SIGINT:
            # A second Ctrl-C stops at once (KeyboardInterrupt).
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT, signal.default_int_handler))
            if self._speak:
                os.write(2, b"\nCtrl-C: stopping after this step to save a checkpoint "
                            b"(Ctrl-C again stops at once, without one)\n")

    def _restore_handlers(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_before:
            return  # mid-accumulation, or an update skipped: no step to stop after
        noted = self._noted
        if trainer.world_size > 1:  # every rank stops at the same step, if any was signalled
            device = trainer.strategy.root_device
            noted = int(trainer.strategy.reduce(torch.tensor(noted, device=device),
                                                reduce_op="max"))
        if not noted:
            return
        # The handlers stay until the trainer has stopped: a repeated SIGTERM must not reach
        # Lightning's (it broadcasts); a second Ctrl-C already stops at once.
        self.signal, self.step = signal.Signals(noted), trainer.global_step
        why = self._save(trainer)
        self._report(trainer, why)
        raise SIGTERMException  # Lightning's stop: loggers end the run, the trainer tears down

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()
        if self._reported:
            return
        if isinstance(exception, SIGTERMException):
            self.signal = signal.SIGTERM
        elif isinstance(exception, KeyboardInterrupt):
            self.signal = signal.SIGINT
        else:
            return
        self.step = trainer.global_step
        self._report(trainer, "Ctrl-C stopped it at once" if self.signal == signal.SIGINT
                     else "the signal came outside the training loop")

    def _save(self, trainer) -> str | None:
        """Save the interrupted step where the ModelCheckpoint keeps the run's checkpoints; set
        ``self.checkpoint``, or return why there is none."""
        keeper = trainer.checkpoint_callback
        if not isinstance(keeper, ModelCheckpoint) or not keeper.dirpath:
            return "the run keeps no checkpoints"
        step = trainer.global_step
        metrics = {**trainer.callback_metrics, "step": step, "epoch": trainer.current_epoch}
        path = trainer.strategy.broadcast(keeper.format_checkpoint_name(metrics))
        # A checkpoint of this very step (the ModelCheckpoint's of this step) is the same state.
        if not trainer.strategy.broadcast(_checkpoint_step(path) == step):
            try:
                # Through the trainer's checkpoint IO: xm2's verified, atomic files (or shards).
                trainer.save_checkpoint(path, weights_only=False)
            except (Xm2Error, OSError) as error:
                return f"the save failed: {error}"
        self.checkpoint = path
        return None

    def _report(self, trainer, why: str | None) -> None:
        self._reported = True
        name, fitting = self.signal.name, trainer.state.fn == TrainerFn.FITTING
        self.summary = (f"interrupted by {name} at step {self.step}" if fitting
                        else f"interrupted by {name} during {trainer.state.fn}")
        if not trainer.is_global_zero:
            return
        if not fitting:
            text = f"Interrupted by {name} during {trainer.state.fn}; nothing to save. Run it " \
                   f"again with: {rerun_command(self.command)}"
        elif self.checkpoint:
            text = f"Interrupted by {name} at step {self.step}: checkpoint {self.checkpoint}\n" \
                   f"Resume with: {resume_command(self.command, self.checkpoint)}"
        else:
            keeper = trainer.checkpoint_callback
            earlier = next((path for path in (getattr(keeper, "last_model_path", ""),
                                              getattr(keeper, "best_model_path", ""),
                                              trainer.ckpt_path or "") if path), None)
            again = (f"Resume from the newest checkpoint with: "
                     f"{resume_command(self.command, earlier)}" if earlier
                     else f"Start it again with: {rerun_command(self.command)}")
            text = f"Interrupted by {name} at step {self.step} without a checkpoint ({why}). {again}"
        print(text, file=sys.stderr, flush=True)


def _checkpoint_step(path: str) -> int | None:
    """The step of the checkpoint at ``path`` (a file with its record, or a sharded folder)."""
    try:
        if Path(path).is_dir():
            return sharded_metadata(path).get("global_step")
        return (read_record(path) or {}).get("global_step") if Path(path).is_file() else None
    except CheckpointError:
        return None


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
        self.interrupt = SaveOnInterrupt(command)
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
                 "decay mixture from that step, in a new MLflow run tagged with its parent. "
                 "With --ckpt_path of a checkpoint the branch wrote: resume the branch.")
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
        branch_from, ckpt_path = config.get("branch_from"), config.get("ckpt_path")
        if branch_from and subcommand != "fit":
            if ckpt_path in (None, branch_from):
                raise CheckpointError(f"--branch_from starts a training run; it is for `xm2 fit`, "
                                      f"not `xm2 {subcommand}`")
            branch_from = None  # a branch's config.yaml: evaluate the --ckpt_path given with it
        if not (branch_from or ckpt_path):
            return
        mode = "branch" if branch_from else "resume" if subcommand == "fit" else "evaluate"
        path = branch_from or self._resolve(config, ckpt_path)
        checkpoint, record = _read_checkpoint(path)
        imported = record.get("imported_from")  # `xm2 import-hf`: weights, no training state
        if mode == "branch":
            plan = self._start_branch(config, path, checkpoint, record)
            # Resuming a branch: the branch's own options plus --ckpt_path of a checkpoint the
            # branch wrote (its printed resume command; its config.yaml, which names the source
            # as ckpt_path too, with --ckpt_path). The checkpoint must equal the branch's settings.
            if ckpt_path not in (None, branch_from):
                mode, path = "resume", self._resolve(config, ckpt_path)
                checkpoint, record = _read_checkpoint(path)
                imported = record.get("imported_from")
                _check_branch_checkpoint(path, checkpoint, branch_from, plan)
        if imported and mode == "resume":
            raise CheckpointError(f"checkpoint {path} was imported from {imported} and has no "
                                  "training state to resume; start a decay branch from it with "
                                  f"--branch_from {path} --branch_decay_steps N")
        _check_tokenizer(config.data, record, path)
        # An imported model's optimizer, schedule and data were never xm2 settings: only its
        # architecture binds what runs from it.
        comparison = resume.compare(resume.checkpoint_settings(checkpoint),
                                    self._current_settings(subcommand),
                                    "evaluate" if imported else mode)
        if comparison.refused:
            advice = (f"give a checkpoint that this branch (--branch_from {branch_from}, its "
                      "decay settings and length) wrote" if branch_from and mode == "resume"
                      else None)
            raise CheckpointError(resume.refusal_message(path, mode, comparison.refused, advice))
        for line in [] if imported else comparison.announce():
            print(f"Applied: {line}", file=sys.stderr)
        if mode == "resume":
            if branch_from:
                print(f"Resuming the decay branch from step {plan.source_step} of {branch_from} "
                      f"at step {checkpoint['global_step']} of {path}", file=sys.stderr)
            lineage.continue_run(config.trainer.logger, record)
            self.resumed_record = record
        elif mode == "evaluate":
            lineage.tag_evaluation_run(config.trainer.logger, record, path, subcommand)
        config.ckpt_path = path

    @staticmethod
    def _resolve(config: Namespace, ckpt_path: str) -> str:
        """``--ckpt_path``: a checkpoint that exists, or ``last`` (the newest of this run)."""
        if ckpt_path == "last":
            path = str(find_last_checkpoint(config.trainer.default_root_dir or ".",
                                            *lineage.run_name_and_experiment(config.trainer.logger)))
            print(f"Resuming from the run's last checkpoint: {path}", file=sys.stderr)
            return path
        if not Path(ckpt_path).exists():
            raise CheckpointError(f"checkpoint {ckpt_path} does not exist; give a checkpoint file "
                                  "or 'last' (the newest checkpoint of this run)")
        return ckpt_path

    @staticmethod
    def _start_branch(config: Namespace, path: str, checkpoint: dict,
                      record: dict) -> resume.BranchPlan:
        """Set the config up as the decay branch from ``path``: decay start, length, its run."""
        plan = resume.plan_branch(checkpoint, path, config.get("branch_decay_steps"),
                                  config.get("branch_decay_tokens"))
        config.model.schedule.decay_start_step = plan.source_step
        config.data.decay_start_step = plan.source_step
        config.trainer.max_steps = plan.max_steps
        lineage.start_branch_run(config.trainer.logger, record, plan.source_step,
                                 plan.source_tokens, plan.decay_steps)
        if config.get("ckpt_path") in (None, path):
            print(f"Branching from step {plan.source_step} of {path}: decay for "
                  f"{plan.decay_steps} steps to step {plan.max_steps}", file=sys.stderr)
            if record.get("imported_from"):
                print(f"{path} is imported and has no optimizer state: AdamW starts fresh (zero "
                      "moments) at the branch's learning rate", file=sys.stderr)
        return plan

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
        devices = device_count(trainer.devices)
        if devices is not None and isinstance(trainer.num_nodes, int):
            settings["world_size"] = devices * trainer.num_nodes
        return resume.current_settings(dumped["model"], dumped["data"], settings)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(self.interrupt)
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


def device_count(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` names (2, "2", "0,1", [0, 1]); None for "auto" or -1,
    which only the trainer resolves."""
    if isinstance(devices, str):
        text = devices.strip().rstrip(",")
        if "," in text:
            return len(text.split(","))
        devices = int(text) if text.isdigit() else None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return devices if isinstance(devices, int) and devices > 0 else None


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
    return _command_for(command, "validate", checkpoint, {
        "--ckpt_path", "--branch_from", "--branch_decay_steps", "--branch_decay_tokens"})


def resume_command(command: list[str] | None, checkpoint: str) -> str:
    """The command line that resumes a ``fit`` started as ``command`` from ``checkpoint``: the
    same words, with ``--ckpt_path <checkpoint>`` instead of any the fit was given (a decay
    branch keeps its ``--branch_from``: both together resume the branch)."""
    return _command_for(command, "fit", checkpoint, {"--ckpt_path"})


def rerun_command(command: list[str] | None) -> str:
    """``command`` as a line to run again (``python -m xm2.cli`` where it was started so)."""
    program, words = _program_and_words(command)
    return shlex.join([*program, *words])


def _program_and_words(command: list[str] | None) -> tuple[list[str], list[str]]:
    if not command:
        return ["xm2"], ["fit"]
    program, words = command[:1], command[1:]
    if Path(program[0]).name in ("cli.py", "__main__.py"):
        program = [sys.executable, "-m", "xm2.cli"]
    return program, words


def _command_for(command: list[str] | None, subcommand: str, checkpoint: str,
                 dropped: set[str]) -> str:
    program, words = _program_and_words(command)
    kept, skip_value = [], False
    for word in words[words.index("fit") + 1:] if "fit" in words else words:
        if skip_value:
            skip_value = False
            continue
        name = word.split("=", 1)[0]
        if name in dropped:
            skip_value = "=" not in word
            continue
        kept.append(word)
    return shlex.join([*program, subcommand, *kept, "--ckpt_path", str(checkpoint)])


# Lightning's legacy precision names and the ones it records (``Trainer(precision=16).precision``
# is "16-mixed"); tests/test_cli.py checks this table against Lightning itself.
_LEGACY_PRECISION = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


def unified_precision(precision: Any) -> str:
    """Lightning's own name for a precision setting (16 -> "16-mixed"), as the trainer records it."""
    return _LEGACY_PRECISION.get(str(precision), str(precision))


def _read_checkpoint(path: str) -> tuple[dict, dict]:
    """A checkpoint's contents (a sharded folder's metadata file) and its xm2 record."""
    checkpoint = (sharded_metadata(path) if Path(path).is_dir()
                  else load_checkpoint_file(path, mmap=True))
    return checkpoint, (checkpoint.get("xm2") or {}).get("record") or {}


def _check_branch_checkpoint(path: str, checkpoint: dict, branch_from: str,
                             plan: resume.BranchPlan) -> None:
    """Refuse a ``--ckpt_path`` that cannot be a checkpoint of the branch from ``branch_from``
    (the settings comparison that follows refuses one of another branch of the same source)."""
    step = int(checkpoint["global_step"])
    if not plan.source_step <= step <= plan.max_steps:
        raise CheckpointError(
            f"--ckpt_path {path} is at step {step}, outside the decay branch from step "
            f"{plan.source_step} of {branch_from} (steps {plan.source_step} to {plan.max_steps}); "
            "give a checkpoint this branch wrote, or leave --ckpt_path out to start the branch")


def _check_tokenizer(data_config: Namespace, record: dict, path: str) -> None:
    tokenizer = data_config.tokenizer_path or default_tokenizer_path(data_config.vocab_size)
    problem = tokenizer_mismatch(record.get("tokenizer_sha256"), tokenizer)
    if problem:
        raise CheckpointError(f"checkpoint {path} {problem}")
