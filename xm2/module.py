"""The LightningModule: the µP decoder, its loss, and AdamW under the WSD schedule."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from xm2.config import ModelConfig
from xm2.model import Decoder
from xm2.optimizer import OptimizerConfig, build_adamw
from xm2.schedule import WSDSchedule


class Xm2Module(L.LightningModule):
    """Next-token training of the µP decoder with a WSD learning-rate schedule."""

    def __init__(
        self,
        architecture: ModelConfig = ModelConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        schedule: WSDSchedule = WSDSchedule(),
    ) -> None:
        """
        Args:
            architecture: Decoder shape and µP multipliers (presets in config/model/).
            optimizer: AdamW settings.
            schedule: WSD schedule; its decay_start_step also switches the data mixture.
        """
        super().__init__()
        self.architecture, self.optimizer_config, self.schedule = architecture, optimizer, schedule
        # Plain dicts, so checkpoints load with weights_only=True and MLflow gets flat params.
        self.save_hyperparameters({"architecture": asdict(architecture),
                                   "optimizer": asdict(optimizer), "schedule": asdict(schedule)})
        self.model = Decoder(architecture)
        self._val_sums: dict[str, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of a (batch, seq+1) token block, in fp32."""
        logits = self.model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.schedule.check_run_length(self.trainer.max_steps)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch["tokens"])
        tokens_per_step = (batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)
                           * self.trainer.accumulate_grad_batches * self.trainer.world_size)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens_seen", float((self.global_step + 1) * tokens_per_step))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.loss(batch["tokens"])
        count = batch["tokens"][:, 1:].numel()
        sums = self._val_sums.setdefault(batch["source"], torch.zeros(2, device=self.device))
        sums += torch.stack([loss.detach().float() * count, torch.tensor(count, device=self.device)])

    def on_validation_epoch_end(self) -> None:
        # Every rank sees every source, so summing per source across ranks lines up.
        metrics = {}
        for source in sorted(self._val_sums):
            loss_sum, count = self.trainer.strategy.reduce(self._val_sums[source], reduce_op="sum")
            metrics[f"val/loss_{source}"] = loss_sum / count
        if metrics:
            metrics["val/loss"] = torch.stack(list(metrics.values())).mean()
            self.log_dict(metrics, prog_bar=False)
            self.log("val_loss", metrics["val/loss"], prog_bar=True)

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
        checkpoint["mup"] = self.architecture.mup_settings()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved, current = checkpoint.get("mup"), self.architecture.mup_settings()
        if saved is not None and saved != current:
            differences = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
            raise ValueError(
                "checkpoint µP settings differ from this model's (key: (checkpoint, model)): "
                f"{differences}; load it with the architecture it was trained with"
            )
