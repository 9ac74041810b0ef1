"""The memory estimate of `xm2 memory` against what the decoder really keeps for its backward pass."""

import pytest
import torch

from tests.conftest import ROOT
from tests.test_cli import xm2
from tests.test_errors import one_line_error
from xm2.config import ModelConfig
from xm2.memory import GIB, estimate, memory, read_architecture
from xm2.model import Decoder

CONFIG = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=320, num_layers=4,
                     num_heads=4, num_kv_heads=2, max_seq_len=64, dim_model_base=32)


def saved_activation_bytes(config: ModelConfig, batch: int, seq: int, autocast: bool) -> int:
    """Bytes of the distinct tensors autograd saves in a forward pass, weights and the
    vocabulary-wide logits left out (the estimate counts those apart)."""
    model = Decoder(config)
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        weight_copy = type(tensor.grad_fn).__name__ == "TBackward0"  # autocast's weight casts
        if (tensor.is_floating_point() and storage.data_ptr() not in skip and not weight_copy
                and tensor.shape[-1] != config.vocab_size):
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(tokens)
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_activation_estimate_is_within_ten_percent_of_the_saved_tensors(precision):
    measured = saved_activation_bytes(CONFIG, 3, 64, autocast=precision == "bf16-mixed")
    estimated = estimate(CONFIG, 3, 64, precision, 1, "single").activations
    assert estimated == pytest.approx(measured, rel=0.10)


def test_states_per_device_follow_the_strategy():
    config = read_architecture("config/model/xmodel2-1.2b.yaml")
    single = estimate(config, 1, 4096, "bf16-mixed", 1, "single")
    fsdp = estimate(config, 1, 4096, "bf16-mixed", 8, "fsdp2")
    checkpointed = estimate(config, 1, 4096, "bf16-mixed", 8, "fsdp2",
                            activation_checkpointing=True)
    assert single.parameters == 1_251_755_520  # the README's count of the preset
    assert single.optimizer == 8 * single.parameters  # AdamW: two fp32 moments
    assert fsdp.optimizer == single.optimizer / 8  # sharded over 8 devices
    assert fsdp.weights < single.weights / 4
    assert checkpointed.activations < fsdp.activations / 8
    ddp = estimate(config, 1, 4096, "bf16-mixed", 8, "ddp")
    assert ddp.gradients == 2 * single.gradients  # DDP's buckets


def test_memory_command_prints_the_table(capsys):
    result = memory("xmodel2-1.2b", devices=8, strategy="fsdp2")
    printed = capsys.readouterr().out
    assert "1,251,755,520 parameters" in printed and "| activations" in printed
    assert result["total"] == pytest.approx(sum(result[k] for k in (
        "weights", "gradients", "optimizer (AdamW)", "activations", "logits and loss")), abs=0.01)
    assert result["total"] * GIB > 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"strategy": "zero3"}, "strategy='zero3'; allowed: single, ddp, fsdp2"),
    ({"precision": "fp8"}, "precision='fp8'; allowed: 32-true, bf16-mixed"),
    ({"model": "huge"}, "model preset 'huge' not found"),
    ({"seq_len": 8192}, "seq_len=8192 exceeds the model's max_seq_len=4096"),
    ({"seq_len": -1}, "seq_len=-1 must be >= 1"),
    ({"batch_size": 0}, "batch_size=0 must be >= 1"),
])
def test_bad_memory_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        memory(**{"model": "xmodel2-1.2b", **kwargs})


def test_memory_command_refuses_a_sequence_length_of_zero(tmp_path):
    # 0 is a length, not "unset": the preset's 4096 must not be estimated instead.
    result = xm2("memory", "--seq_len", "0", cwd=ROOT)
    assert one_line_error(result) == ("xm2: error: seq_len=0 must be >= 1 (tokens per sequence); "
                                      "leave it out for the preset's max_seq_len=4096")
    assert result.stdout == ""
