"""DDP and FSDP2 through Lightning's strategies on real gloo process groups (CPU): validation that
no rank waits on another, training that matches one process on the same global batch, sharded
checkpoints that resume exactly and consolidate into a file one device loads.

Each distributed run is tests/distributed_run.py in a subprocess: Lightning's launcher starts the
other ranks by running the command line again, which under pytest would be pytest itself.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.test_cli import XM2, smoke_args, xm2
from xm2 import mup
from xm2.checkpoint import load_checkpoint_file, record_path
from xm2.config import ModelConfig
from xm2.data.mixture import PackedRows, ValidationBatches
from xm2.interop.sharded import consolidate_checkpoint, is_sharded_checkpoint
from xm2.model import Decoder
from xm2.parallel import ParallelConfig, apply

RUN = ROOT / "tests" / "distributed_run.py"
# Two processes add their gradients where one process accumulates two micro-batches; halving is
# exact in binary floating point, so the runs agree to the last bit on CPU. The tolerance leaves
# room for other reduction orders (more ranks, other kernels) without hiding a real difference,
# which is orders of magnitude larger (one step of a different batch moves the loss by ~0.1).
LOSS_TOLERANCE = 1e-5
ARCHITECTURE = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2,
                           num_heads=2, num_kv_heads=1, max_seq_len=64, dim_model_base=32)


def run(out: Path, tokenizer_path: Path, shards: Path, *args: str) -> list[dict]:
    """Run distributed_run.py; return each rank's record."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(RUN), "--tokenizer_path", str(tokenizer_path),
         "--shards_dir", str(shards.parent), "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    records = sorted(out.glob("rank*.json"))
    return [json.loads(path.read_text()) for path in records]


def val_losses(record: dict) -> list[dict]:
    return [{k: v for k, v in entry.items() if k.startswith("val/")}
            for entry in record["validations"]]


# --- validation: every rank the same number of forward passes, sources reduced in one order ---

def test_validation_batches_are_dealt_evenly_with_padding():
    sources = {name: PackedRows(np.arange(rows * 8 + 1), 8, name)
               for name, rows in [("a", 5), ("b", 3), ("c", 9)]}
    everything = [b["source"] for b in ValidationBatches(sources, 2, 4)]
    assert everything == ["a", "a", "a", "b", "b", "c", "c", "c", "c"]
    for world_size in (2, 3, 4, 8, 16):
        ranks = [[b["source"] for b in ValidationBatches(sources, 2, 4, rank, world_size)]
                 for rank in range(world_size)]
        assert len({len(batches) for batches in ranks}) == 1, ranks  # no rank waits
        real = sorted(s for batches in ranks for s in batches if s is not None)
        assert real == sorted(everything)  # each real batch exactly once


@pytest.mark.slow
def test_validation_gives_the_same_losses_on_1_and_3_processes(tmp_path, tokenizer_path,
                                                                   shards):
    # One batch per source: 2 ranks see 3 and 2 sources, 3 ranks 2, 2 and 1 (the old deadlock),
    # and under FSDP2 a rank without a batch must still join each parameter gather.
    # Two processes are compared with one in the training test below (validation at steps 3, 6).
    common = ("--task", "validate", "--val_batches_per_source", "1")
    one = run(tmp_path / "one", tokenizer_path, shards, "--strategy", "single", *common)
    fsdp = run(tmp_path / "fsdp2", tokenizer_path, shards, "--strategy", "fsdp2", "--devices",
               "3", *common)
    expected = val_losses(one[0])[0]
    assert sorted(expected) == ["val/loss", *(f"val/loss_{s}" for s in
                                              ["code", "docs", "instruct_code", "instruct_math",
                                               "prose"])]
    for records, world_size in ((fsdp, 3),):
        assert [r["world_size"] for r in records] == [world_size] * world_size
        for record in records:
            got = val_losses(record)[0]
            assert got.keys() == expected.keys()
            for key in expected:
                assert got[key] == pytest.approx(expected[key], abs=LOSS_TOLERANCE), key


# --- a model built on the meta device is the model built directly ---

def test_meta_device_model_materialises_to_the_directly_built_one():
    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_seq_len=16, dim_model_base=16)
    torch.manual_seed(7)
    direct = Decoder(config)
    torch.manual_seed(7)
    with torch.device("meta"):
        lazy = Decoder(config)
    assert all(t.is_meta for t in (*lazy.parameters(), *lazy.buffers()))
    lazy.to_empty(device="cpu")
    # to_empty leaves whatever the memory held; make that visible garbage.
    for tensor in (*lazy.parameters(), *lazy.buffers()):
        tensor.data.fill_(float("nan"))
    lazy.reset_parameters()
    for (name, a), (_, b) in zip(direct.named_buffers(), lazy.named_buffers(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(direct.named_parameters(), lazy.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    # µP init, not PyTorch's default: hidden matrices at init_std/√m, norm gains at 1.
    std = config.init_std / config.width_multiplier**0.5
    assert lazy.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(std, rel=0.1)
    assert torch.equal(lazy.norm.weight, torch.ones(config.hidden_size))
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    assert torch.equal(direct(tokens), lazy(tokens))


# --- training: DDP and FSDP2 on 2 processes equal one process on the same global batch ---

@pytest.fixture(scope="module")
def training_runs(tmp_path_factory, tokenizer_path, shards) -> dict[str, list[dict]]:
    """6 steps (warmup 2, decay from 4), validated at steps 3 and 6. One process accumulates two
    micro-batches per step: the same micro-batches that ranks 0 and 1 of a 2-process run draw."""
    root = tmp_path_factory.mktemp("training")
    return {
        "single": run(root / "single", tokenizer_path, shards, "--strategy", "single",
                      "--accumulate", "2"),
        "ddp": run(root / "ddp", tokenizer_path, shards, "--strategy", "ddp", "--devices", "2"),
        # Meta-device construction and activation checkpointing must not change a thing.
        "fsdp2": run(root / "fsdp2", tokenizer_path, shards, "--strategy", "fsdp2", "--devices",
                     "2", "--meta_init", "--activation_checkpointing", "--checkpoint_every", "3"),
        "root": root,
    }


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_train_like_one_on_the_same_global_batch(training_runs, strategy):
    single, ranks = training_runs["single"][0], training_runs[strategy]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for step, expected in single["steps"].items():
        for rank, record in enumerate(ranks):
            got = record["steps"][step]
            assert got["losses"][0] == pytest.approx(expected["losses"][rank], abs=LOSS_TOLERANCE)
            assert got["lr"] == expected["lr"]  # every µP group, warmup and decay alike
            assert got["phase"] == expected["phase"]
    phases = [single["steps"][str(s)]["phase"] for s in range(6)]
    assert phases == ["stable"] * 4 + ["decay"] * 2  # the switch at decay_start_step=4
    # The mixture monitor counts every rank's tokens: each rank holds the global counts.
    assert all(record["mixture"] == single["mixture"] for record in ranks)
    assert set(single["mixture"]) == {"stable", "decay"}
    assert [v["step"] for v in ranks[0]["validations"]] == [3, 6]
    for got, expected in zip(val_losses(ranks[0]), val_losses(single), strict=True):
        assert got == pytest.approx(expected, abs=LOSS_TOLERANCE)
    weights = torch.load(training_runs["root"] / strategy / "weights.pt", weights_only=True)
    reference = torch.load(training_runs["root"] / "single" / "weights.pt", weights_only=True)
    for name, tensor in reference.items():
        assert torch.allclose(weights[name], tensor, atol=LOSS_TOLERANCE, rtol=0), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_mup_groups_are_the_same_on_every_rank_and_unwrapped(training_runs, strategy):
    unwrapped = Decoder(ARCHITECTURE)
    expected = [{"name": g["name"], "lr": g["lr"], "weight_decay": g["weight_decay"],
                 "numel": sum(p.numel() for p in g["params"])}
                for g in mup.param_groups(unwrapped.named_parameters(), ARCHITECTURE, 0.01, 0.1)]
    names = {id(p): n for n, p in unwrapped.named_parameters()}
    expected_names = [sorted(names[id(p)] for p in g["params"])
                      for g in mup.param_groups(unwrapped.named_parameters(), ARCHITECTURE,
                                                0.01, 0.1)]
    for record in training_runs[strategy]:
        groups = record["groups"]
        assert [{k: g[k] for k in ("name", "lr", "weight_decay", "numel")} for g in groups] \
            == expected
        assert [[n.removeprefix("model.") for n in g["params"]] for g in groups] == expected_names
        assert groups[1]["lr"] == 0.01 / ARCHITECTURE.width_multiplier  # hidden: lr/m
        sharded = strategy == "fsdp2"
        assert record["sharded"] is sharded
        for group in groups:  # each rank holds half of every group under FSDP2
            assert group["local_numel"] * (2 if sharded else 1) == group["numel"]


# --- FSDP2 distributed checkpoints: exact resume, and one file for one device ---

@pytest.mark.slow
def test_fsdp2_distributed_checkpoint_resumes_identically(training_runs, tokenizer_path, shards):
    root = training_runs["root"]
    checkpoint = root / "fsdp2" / "checkpoints" / "step=3.ckpt"
    assert is_sharded_checkpoint(checkpoint)
    assert sorted(p.name for p in checkpoint.glob("__*_0.distcp")) == ["__0_0.distcp",
                                                                      "__1_0.distcp"]
    resumed = run(root / "resumed", tokenizer_path, shards, "--strategy", "fsdp2", "--devices",
                  "2", "--meta_init", "--activation_checkpointing", "--ckpt_path",
                  str(checkpoint))
    straight = training_runs["fsdp2"]
    for rank in (0, 1):
        assert sorted(resumed[rank]["steps"]) == ["3", "4", "5"]
        for step in ("3", "4", "5"):
            assert resumed[rank]["steps"][step] == straight[rank]["steps"][step]
        assert resumed[rank]["validations"] == straight[rank]["validations"][1:]
    weights = torch.load(root / "resumed" / "weights.pt", weights_only=True)
    reference = torch.load(root / "fsdp2" / "weights.pt", weights_only=True)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_sharded_checkpoint_consolidates_into_the_trained_weights(training_runs, tmp_path):
    root = training_runs["root"]
    target = Path(consolidate_checkpoint(str(root / "fsdp2" / "checkpoints" / "step=6.ckpt"),
                                         str(tmp_path / "step=6.ckpt")))
    assert record_path(target).is_file()  # digest record, like every xm2 checkpoint
    checkpoint = load_checkpoint_file(target)
    reference = torch.load(root / "fsdp2" / "weights.pt", weights_only=True)
    assert checkpoint["global_step"] == 6
    assert {k.removeprefix("model."): v.shape for k, v in checkpoint["state_dict"].items()} == \
        {k: v.shape for k, v in reference.items()}
    for name, tensor in reference.items():
        assert torch.equal(checkpoint["state_dict"][f"model.{name}"], tensor), name


@pytest.mark.slow
def test_torchrun_trains_fsdp2_through_the_cli_and_validate_loads_the_consolidated_checkpoint(
        tmp_path, tokenizer_path, shards):
    """The launch docs/distributed.md gives, on 2 CPU processes: torchrun starts the ranks,
    Lightning finds them (no second launch), xm2 trains with config/trainer/fsdp2.yaml into
    MLflow, and the sharded checkpoint becomes a file that `xm2 validate` evaluates alike."""
    args = [*smoke_args(tmp_path, tokenizer_path, shards),
            "--config", str(ROOT / "config" / "trainer" / "fsdp2.yaml"),
            # fp32 throughout, so one device reproduces the validation loss closely
            "--trainer.precision", "32-true", "--model.parallel.mixed_precision", "none"]
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    # Both ranks open the store at start-up; two processes creating a new SQLite store at
    # once race on its schema, so it exists first (a tracking server avoids this too).
    MlflowClient(tracking_uri).search_experiments()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    fit = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "xm2.cli", "fit", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600)
    assert fit.returncode == 0, fit.stderr[-4000:]
    client = MlflowClient(tracking_uri)
    [trained] = client.search_runs([client.get_experiment_by_name("xm2").experiment_id])
    for source in ["code", "docs", "instruct_code", "instruct_math", "prose"]:
        steps = [p.step for p in client.get_metric_history(trained.info.run_id,
                                                           f"val/loss_{source}")]
        assert len(steps) == 3 and steps == sorted(steps), (source, steps)  # every 4 steps
    checkpoint = next(tmp_path.rglob("step=12.ckpt"))
    assert is_sharded_checkpoint(checkpoint)
    consolidated = xm2("consolidate-checkpoint", str(checkpoint), cwd=tmp_path)
    assert consolidated.returncode == 0, consolidated.stderr[-4000:]
    single_file = checkpoint.with_name("step=12.consolidated.ckpt")
    validate = xm2("validate", *smoke_args(tmp_path, tokenizer_path, shards),
                   "--trainer.precision", "32-true", "--ckpt_path", str(single_file),
                   cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr[-4000:]
    runs = client.search_runs([client.get_experiment_by_name("xm2").experiment_id])
    [evaluation] = [run for run in runs if run.info.run_id != trained.info.run_id]
    for key, value in trained.data.metrics.items():
        if key.startswith("val/"):
            assert evaluation.data.metrics[key] == pytest.approx(value, abs=1e-4), key


# --- the process group stays on this machine ---

def listening_sockets() -> dict[str, tuple[str, int]]:
    """Every listening TCP socket of this machine: inode -> (address, port)."""
    found = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found[fields[9]] = (socket.inet_ntop(family, raw), int(port, 16))
    return found


def process_tree(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
        except OSError:
            continue
    return [pid, *(grandchild for child in children for grandchild in process_tree(child))]


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    except OSError:  # the process or the descriptor is gone
        pass
    return inodes


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_two_process_run_listens_on_loopback_only(strategy, tmp_path, tokenizer_path, shards):
    """torch's rendezvous store listens on every interface by default (`*:<port>`); xm2's
    strategies keep a one-machine group on 127.0.0.1. Polled from /proc while the run is alive."""
    args = [*smoke_args(tmp_path, tokenizer_path, shards),
            "--config", str(ROOT / "config" / "trainer" / f"{strategy}.yaml"),
            "--trainer.devices", "2", "--trainer.accelerator", "cpu",
            "--trainer.max_steps", "4", "--model.schedule.decay_start_step", "3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "fit.log"
    with log.open("w") as output:
        run = subprocess.Popen([*XM2, "fit", *args], cwd=tmp_path, env=env, stdout=output,
                               stderr=subprocess.STDOUT)
    seen: dict[tuple[int, str, int], None] = {}
    deadline = time.monotonic() + 400
    while run.poll() is None and time.monotonic() < deadline:
        listening = listening_sockets()
        for pid in process_tree(run.pid):
            for inode in socket_inodes(pid) & listening.keys():
                seen[(pid, *listening[inode])] = None
        time.sleep(0.1)
    if run.poll() is None:
        run.kill()
    assert run.wait() == 0, log.read_text()[-4000:]
    # Rank 0 serves the store and both ranks' gloo pairs listen: all of it on loopback.
    assert len({pid for pid, _, _ in seen}) == 2, seen
    assert {address for _, address, _ in seen} <= {"127.0.0.1", "::1"}, seen


# --- configs and switches ---

def test_the_1_2b_recipe_parses_with_fsdp2(tmp_path):
    # nano.yaml + trainer/fsdp2.yaml are composed by the torchrun test above.
    result = xm2("fit", "--config", str(ROOT / "config" / "xmodel2-1.2b.yaml"), "--print_config",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["trainer"]["strategy"]["class_path"] == "xm2.parallel.FSDP2Strategy"
    assert printed["model"]["parallel"]["mixed_precision"] == "bf16"
    assert printed["model"]["parallel"]["meta_init"] is True


def test_fsdp2_mixed_precision_is_refused_under_another_strategy():
    with torch.device("meta"):
        model = Decoder(ARCHITECTURE)
    with pytest.raises(ValueError, match=r"mixed_precision='bf16' is FSDP2's .* DDPStrategy"):
        apply(model, ParallelConfig(mixed_precision="bf16"), DDPStrategy(), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"mixed_precision='fp8'; allowed: none, bf16"):
        ParallelConfig(mixed_precision="fp8")
