"""The LightningModule: µP state through checkpoints and FSDP2 wrapping."""

import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from xm2 import mup
from xm2.config import ModelConfig
from xm2.module import Xm2Module
from xm2.schedule import WSDSchedule

ARCHITECTURE = dict(vocab_size=64, hidden_size=64, intermediate_size=160, num_layers=2,
                    num_heads=2, num_kv_heads=1, max_seq_len=16, dim_model_base=32)


def module(**overrides) -> Xm2Module:
    return Xm2Module(architecture=ModelConfig(**{**ARCHITECTURE, **overrides}),
                     schedule=WSDSchedule(warmup_steps=1, decay_start_step=2))


def batches(count: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = [{"tokens": torch.randint(0, 64, (2, 17), generator=generator)} for _ in range(count)]
    return DataLoader(data, batch_size=None)


def train_checkpoint(tmp_path) -> str:
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module(), train_dataloaders=batches())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def test_checkpoint_records_mup_settings_and_loads_weights_only(tmp_path):
    checkpoint = torch.load(train_checkpoint(tmp_path), weights_only=True)
    assert checkpoint["mup"] == {"use_mup": True, "dim_model_base": 32, "hidden_size": 64,
                                 "width_multiplier": 2.0, "scale_emb": 12.0, "scale_depth": 1.4,
                                 "init_std": 0.1}


@pytest.mark.parametrize("overrides, difference", [
    (dict(dim_model_base=64), "'dim_model_base': (32, 64)"),
    (dict(use_mup=False), "'use_mup': (True, False)"),
])
def test_loading_into_other_mup_settings_is_refused(tmp_path, overrides, difference):
    path = train_checkpoint(tmp_path)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="checkpoint µP settings differ") as error:
        trainer.validate(module(**overrides), dataloaders=batches(1), ckpt_path=path)
    assert difference in str(error.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_worker(rank: int, world_size: int, port: int, results) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        torch.manual_seed(0)
        config = ModelConfig(**ARCHITECTURE)
        plain = module().model
        sharded = module().model
        sharded.load_state_dict(plain.state_dict())
        mesh = init_device_mesh("cpu", (world_size,))
        for block in sharded.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        groups = mup.param_groups(sharded.named_parameters(), config, lr=0.01, weight_decay=0.1)
        plain_groups = mup.param_groups(plain.named_parameters(), config, lr=0.01,
                                        weight_decay=0.1)
        optimizer = torch.optim.AdamW(groups)
        reference = torch.optim.AdamW(plain_groups)
        tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
        for model, opt in ((sharded, optimizer), (plain, reference)):
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            opt.step()
        after = {name: p.full_tensor() for name, p in sharded.named_parameters()}
        if rank == 0:
            results["groups"] = [(g["name"], g["lr"], len(g["params"])) for g in groups]
            results["plain_groups"] = [(g["name"], g["lr"], len(g["params"])) for g in plain_groups]
            results["max_difference"] = max(
                (after[name] - p).abs().max().item() for name, p in plain.named_parameters())
        # Neither rank may tear the group down while the other still uses it: gloo aborts.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_roles_and_learning_rates_survive_fsdp2_sharding():
    """Two gloo processes shard the decoder with FSDP2; groups and the update match unsharded."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_fsdp2_worker, args=(2, _free_port(), results), nprocs=2)
        assert results["groups"] == results["plain_groups"]
        assert dict((n, lr) for n, lr, _ in results["groups"])["hidden"] == pytest.approx(0.005)
        assert results["max_difference"] < 1e-5
