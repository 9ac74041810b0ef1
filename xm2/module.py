"""The LightningModule: the µP decoder, its loss, and AdamW under the WSD schedule."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from xm2.config import ModelConfig
from xm2.errors import CheckpointError, ConfigError, NonFiniteLossError
from xm2.model import Decoder
from xm2.optimizer import OptimizerConfig, build_adamw
from xm2.parallel import ParallelConfig
from xm2.parallel import apply as apply_parallel
from xm2.schedule import WSDSchedule
from xm2.tracking import run_identity

# Skipping steps can hide a run that has gone bad for good: stop after this many in a row.
MAX_CONSECUTIVE_SKIPPED_STEPS = 10


class Xm2Module(L.LightningModule):
    """Next-token training of the µP decoder with a WSD learning-rate schedule."""

    def __init__(
        self,
        architecture: ModelConfig = ModelConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        schedule: WSDSchedule = WSDSchedule(),
        on_nonfinite_loss: Literal["stop", "skip"] = "stop",
        parallel: ParallelConfig = ParallelConfig(),
    ) -> None:
        """
        Args:
            architecture: Decoder shape and µP multipliers (presets in config/model/).
            optimizer: AdamW settings.
            schedule: WSD schedule; its decay_start_step also switches the data mixture.
            on_nonfinite_loss: stop: end the run with an error, keeping the last good checkpoint;
                skip: drop that step's update and go on (stops after 10 skipped steps in a row).
            parallel: Sharding (FSDP2) mixed precision, activation checkpointing, compile per
                block and meta-device construction; the strategy itself is trainer.strategy
                (config/trainer/).
        """
        super().__init__()
        if on_nonfinite_loss not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite_loss={on_nonfinite_loss!r}; allowed: stop, skip")
        self.architecture, self.optimizer_config, self.schedule = architecture, optimizer, schedule
        self.on_nonfinite_loss = on_nonfinite_loss
        # Plain dicts, so checkpoints load with weights_only=True and MLflow gets flat params.
        self.save_hyperparameters({"architecture": asdict(architecture),
                                   "optimizer": asdict(optimizer), "schedule": asdict(schedule),
                                   "on_nonfinite_loss": on_nonfinite_loss,
                                   "parallel": asdict(parallel)})
        self.parallel = parallel
        # On the meta device the model takes no memory until configure_model has sharded it;
        # it is then initialised from the generator state of this moment, so it is the model
        # that would have been built here.
        self._init_rng_state = torch.get_rng_state() if parallel.meta_init else None
        with torch.device("meta") if parallel.meta_init else contextlib.nullcontext():
            self.model = Decoder(architecture)
        self._val_sums: dict[str, torch.Tensor] = {}
        self._tokens_per_step: int | None = None
        self._skipped_in_a_row = 0
        self.skipped_steps = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def configure_model(self) -> None:
        """Shard, checkpoint, compile and materialise the decoder for this run's strategy."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        device = strategy.root_device if strategy is not None else self.device
        with torch.random.fork_rng(devices=[]):
            if self._init_rng_state is not None:
                torch.set_rng_state(self._init_rng_state)
            apply_parallel(self.model, self.parallel, strategy, device)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a (batch, seq+1) token block, in fp32."""
        logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.schedule.check_run_length(self.trainer.max_steps)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss = self.loss(batch["tokens"])
        self._tokens_per_step = (batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)
                                 * self.trainer.accumulate_grad_batches * self.trainer.world_size)
        # Decided by all ranks together, so that no rank waits on another that stopped or skipped.
        nonfinite = self.trainer.strategy.reduce_boolean_decision(
            not bool(torch.isfinite(loss)), all=False)
        if nonfinite:
            return self._nonfinite_step(loss)
        self._skipped_in_a_row = 0
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens_seen", float((self.global_step + 1) * self._tokens_per_step))
        return loss

    def _nonfinite_step(self, loss: torch.Tensor) -> None:
        self.skipped_steps += 1
        self._skipped_in_a_row += 1
        if self.on_nonfinite_loss == "stop" or self._skipped_in_a_row > MAX_CONSECUTIVE_SKIPPED_STEPS:
            raise NonFiniteLossError(
                f"the training loss is {loss.item()} at step {self.global_step}"
                + (f" after {self._skipped_in_a_row - 1} skipped steps in a row"
                   if self.on_nonfinite_loss == "skip" else "")
                + "; the run stopped and its last good checkpoint is kept. Lower "
                "model.optimizer.lr, check the data, or set model.on_nonfinite_loss: skip"
            )
        self.log("train/skipped_steps", float(self.skipped_steps))
        return None  # Lightning skips the backward pass and the update of this step

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Padding batches (source None) keep every rank at the same number of forward passes,
        # which sharded models need (each forward gathers parameters from all ranks).
        loss = self.loss(batch["tokens"])
        if batch["source"] is None:
            return
        count = batch["tokens"][:, 1:].numel()
        sums = self._val_sums.setdefault(batch["source"], torch.zeros(2, device=self.device))
        sums += torch.stack([loss.detach().float() * count, torch.tensor(count, device=self.device)])

    def _validation_sources(self) -> list[str]:
        """Every source any rank validated, in one order on all ranks."""
        names = set(self._val_sums)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, sorted(names))
            names = set().union(*gathered)
        return sorted(names)

    def on_validation_epoch_end(self) -> None:
        # Ranks validate different batches and may see different sources; all of them reduce one
        # (sources × [loss sum, token count]) tensor over the same sorted list, zeros where a rank
        # saw none of a source, so the collectives match and each row sums one source.
        sources = self._validation_sources()
        sums = torch.stack([self._val_sums.get(name, torch.zeros(2, device=self.device))
                            for name in sources]) if sources else torch.zeros(0, 2)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        metrics = {f"val/loss_{name}": sums[i, 0] / sums[i, 1] for i, name in enumerate(sources)}
        if metrics:
            metrics["val/loss"] = torch.stack(list(metrics.values())).mean()
            # Equal on every rank already; sync_dist only tells Lightning so.
            self.log_dict(metrics, prog_bar=False, sync_dist=True)
            self.log("val_loss", metrics["val/loss"], prog_bar=True, sync_dist=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def configure_optimizers(self) -> dict:
        optimizer = build_adamw(self.model, self.architecture, self.optimizer_config)
        total_steps = self.trainer.max_steps
        # LambdaLR scales each group's own initial LR, which keeps the µP ratio lr/m.
        scheduler = LambdaLR(optimizer, lambda step: self.schedule.lr_factor(step, total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Each rank checks its own shards; all decide together, so none waits in the save.
        bad = []
        for name, tensor in checkpoint["state_dict"].items():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                bad.append(name)
        if self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            raise NonFiniteLossError(
                f"weights {', '.join(bad[:3]) or 'on another rank'} are not finite at step "
                f"{self.global_step}; the checkpoint was not written, so the last good one is kept. "
                "Lower model.optimizer.lr or check the data"
            )
        checkpoint["mup"] = self.architecture.mup_settings()
        checkpoint["xm2"] = {"record": self.checkpoint_record(), "trainer": self.trainer_settings()}

    def checkpoint_record(self) -> dict:
        """What a checkpoint says about its run; also written beside it (see xm2.checkpoint)."""
        trainer, datamodule = self.trainer, self.trainer.datamodule
        tokens = self.global_step * self._tokens_per_step if self._tokens_per_step else None
        return {
            "global_step": self.global_step,
            "tokens_seen": tokens,
            "decay_start_step": self.schedule.decay_start_step,
            "tokenizer_sha256": getattr(datamodule, "tokenizer_sha256", None),
            "tokenizer_path": str(getattr(datamodule, "tokenizer_path", "")) or None,
            # Lightning writes a step's metrics to the loggers only after its checkpoint: a kill in
            # between would lose them, so the checkpoint carries them for the resume to log.
            "last_step_metrics": {key: float(value) for key, value in trainer.callback_metrics.items()
                                  if key.startswith("train/") and torch.is_tensor(value)
                                  and value.numel() == 1},
            **run_identity(trainer.logger),
        }

    def trainer_settings(self) -> dict:
        """The trainer settings that define a run: a resume with other values is refused."""
        trainer = self.trainer
        return {
            "max_steps": trainer.max_steps,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "gradient_clip_val": trainer.gradient_clip_val,
            "seed": os.environ.get("PL_GLOBAL_SEED"),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, current = checkpoint.get("mup"), self.architecture.mup_settings()
        if saved is not None and saved != current:
            differences = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
            raise CheckpointError(
                "checkpoint µP settings differ from this model's (key: (checkpoint, model)): "
                f"{differences}; load it with the architecture it was trained with"
            )
