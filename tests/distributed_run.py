"""One small xm2 run under a chosen Lightning strategy, for tests/test_distributed.py.

A script, not a test: Lightning's launcher starts the other ranks by running this command line
again (under pytest it would run pytest again), and ``torchrun`` can start it too. Each rank writes
``<out>/rank<r>.json``: per optimizer step the loss of each micro-batch, each µP group's learning
rate and the data phase; the validation losses; the optimizer groups; and rank 0 writes
``<out>/weights.pt``, the full (unsharded) weights at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.tensor import DTensor

from callbacks.mixture import MixtureMonitor
from xm2.config import ModelConfig
from xm2.data.datamodule import MixtureDataModule
from xm2.module import Xm2Module
from xm2.optimizer import OptimizerConfig
from xm2.parallel import FSDP2Strategy, ParallelConfig
from xm2.schedule import WSDSchedule

ROOT = Path(__file__).resolve().parents[1]
# The architecture of tests/configs/smoke.yaml, so `xm2 validate` with it loads these checkpoints.
ARCHITECTURE = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
                           num_heads=2, num_kv_heads=1, max_seq_len=64, dim_model_base=32)
# The nano preset with the test tokenizer's vocabulary, for timing (benchmarks/).
NANO = ModelConfig(vocab_size=512)


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}
        self.validations: list[dict] = []
        self.groups: list[dict] = []
        self.step_seconds: list[float] = []
        self._started = 0.0
        self.sharded = False

    def on_train_start(self, trainer, pl_module) -> None:
        names = {id(p): n for n, p in pl_module.model.named_parameters()}
        self.groups = [{"name": g["name"], "lr": g["initial_lr"], "weight_decay": g["weight_decay"],
                        "params": sorted(names[id(p)] for p in g["params"]),
                        "numel": sum(p.numel() for p in g["params"]),
                        "local_numel": sum(local(p).numel() for p in g["params"])}
                       for g in trainer.optimizers[0].param_groups]
        self.sharded = all(isinstance(p, DTensor) for p in pl_module.model.parameters())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()
        self.steps.setdefault(batch["step"], {
            "losses": [], "phase": batch["phase"],
            "lr": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_seconds.append(time.perf_counter() - self._started)
        # Lightning hands back the loss divided by the accumulation; undo it.
        self.steps[batch["step"]]["losses"].append(
            float(outputs["loss"]) * trainer.accumulate_grad_batches)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validations.append({"step": trainer.global_step, **{
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val")}})


def local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_weights(module: Xm2Module) -> dict[str, torch.Tensor]:
    # Every rank gathers every parameter, in the same order, so the collectives line up.
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for name, p in module.model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["single", "ddp", "fsdp2"], required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--task", choices=["fit", "validate"], default="fit")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument("--val_every", type=int, default=3)
    parser.add_argument("--val_batches_per_source", type=int, default=1)
    parser.add_argument("--checkpoint_every", type=int, default=0)
    parser.add_argument("--ckpt_path", default=None)
    parser.add_argument("--meta_init", action="store_true")
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    # Below the smoke model's gradient norm (about 0.4 at the start), so clipping acts each step
    # and a per-shard instead of global norm would show.
    parser.add_argument("--clip", type=float, default=0.1)
    parser.add_argument("--mixed_precision", default="none")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--architecture", choices=["smoke", "nano"], default="smoke")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--tokenizer_path", required=True)
    parser.add_argument("--shards_dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # two cores, several ranks: no oversubscription
    L.seed_everything(1234, verbose=False)

    architecture = ARCHITECTURE if args.architecture == "smoke" else NANO
    data = MixtureDataModule(
        corpus_dir=str(ROOT / "data" / "corpus"), tokenizer_path=args.tokenizer_path,
        shards_dir=args.shards_dir, batch_size=args.batch_size,
        val_batches_per_source=args.val_batches_per_source, vocab_size=architecture.vocab_size,
        seq_len=architecture.max_seq_len, decay_start_step=4)
    module = Xm2Module(
        architecture, OptimizerConfig(lr=0.01),
        WSDSchedule(warmup_steps=2, decay_start_step=4),
        parallel=ParallelConfig(meta_init=args.meta_init,
                                activation_checkpointing=args.activation_checkpointing,
                                compile=args.compile, mixed_precision=args.mixed_precision))
    strategy = {"single": "auto", "ddp": DDPStrategy(process_group_backend="gloo"),
                "fsdp2": FSDP2Strategy()}[args.strategy]
    recorder = Recorder()
    mixture = MixtureMonitor()
    callbacks: list = [recorder, mixture]
    if args.checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=out / "checkpoints", filename="{step}",
                                         every_n_train_steps=args.checkpoint_every,
                                         save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, precision=args.precision,
        max_steps=args.max_steps, accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip, val_check_interval=args.val_every * args.accumulate, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(args.checkpoint_every),
        callbacks=callbacks, default_root_dir=out)
    started = time.perf_counter()
    if args.task == "fit":
        trainer.fit(module, datamodule=data, ckpt_path=args.ckpt_path)
    else:
        trainer.validate(module, datamodule=data, ckpt_path=args.ckpt_path)
    seconds = time.perf_counter() - started
    weights = full_weights(module)
    rank = trainer.global_rank
    if rank == 0:
        torch.save(weights, out / "weights.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "steps": {str(k): v for k, v in sorted(recorder.steps.items())},
        "validations": recorder.validations, "groups": recorder.groups,
        "world_size": trainer.world_size, "seconds": seconds,
        "step_seconds": recorder.step_seconds,
        "sharded": recorder.sharded,
        "rope_cos": module.model.rope_cos.tolist()[:3],
        # Tokens per source and phase as the mixture monitor counted them (over all ranks).
        "mixture": {phase: counts.tolist() for phase, counts in mixture.tokens.items()},
    }))


if __name__ == "__main__":
    main()
