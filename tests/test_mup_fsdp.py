"""µP roles and learning rates survive FSDP2 sharding: two real gloo processes on CPU."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from xm2 import mup
from xm2.config import ModelConfig
from xm2.model import Decoder

CONFIG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_seq_len=16, dim_model_base=16)


def groups_by_name(model: torch.nn.Module) -> dict[str, tuple[float, int]]:
    """Each optimizer group's learning rate and its parameter count (summed over shards)."""
    groups = mup.param_groups(model.named_parameters(), CONFIG, lr=0.01, weight_decay=0.1)
    return {g["name"]: (g["lr"], len(g["params"])) for g in groups}


def shard_and_step(rank: int, port: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = Decoder(CONFIG)
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(
            mup.param_groups(model.named_parameters(), CONFIG, lr=0.01, weight_decay=0.1))
        tokens = torch.randint(0, CONFIG.vocab_size, (2, 16))
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        results[rank] = {
            "groups": groups_by_name(model),
            "sharded": all(isinstance(p, DTensor) for p in model.parameters()),
            "names": sorted(name for name, _ in model.named_parameters()),
        }
        # Neither rank may tear the group down while the other still uses it: gloo aborts.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_sharding_keeps_roles_and_per_group_lr():
    unwrapped = Decoder(CONFIG)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(shard_and_step, args=(free_port(), results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        assert results[rank]["sharded"]
        assert results[rank]["names"] == sorted(name for name, _ in unwrapped.named_parameters())
        assert results[rank]["groups"] == groups_by_name(unwrapped)
    assert results[0]["groups"]["hidden"][0] == 0.01 / CONFIG.width_multiplier
