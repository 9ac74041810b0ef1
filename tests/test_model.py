"""The decoder: the paper's parameter count, causality, GQA and tied embeddings."""

import pytest
import torch

from tests.presets import load_architecture
from xm2.config import ModelConfig
from xm2.model import Decoder


def test_xmodel2_preset_has_the_papers_parameter_count():
    config = load_architecture("xmodel2-1.2b")
    assert (config.hidden_size, config.intermediate_size, config.num_heads) == (1536, 3840, 24)
    assert (config.num_kv_heads, config.num_layers, config.max_seq_len) == (8, 48, 4096)
    assert config.vocab_size == 65280
    with torch.device("meta"):
        model = Decoder(config)
    assert model.num_parameters() == 1_251_755_520


@pytest.mark.parametrize("preset, low, high", [("nano", 5.5e6, 7e6), ("tiny", 50e6, 58e6)])
def test_proxy_presets_have_their_nominal_size(preset, low, high):
    with torch.device("meta"):
        model = Decoder(load_architecture(preset))
    assert low < model.num_parameters() < high


def small_config(**overrides) -> ModelConfig:
    settings = dict(vocab_size=64, hidden_size=32, intermediate_size=80, num_layers=2,
                    num_heads=4, num_kv_heads=2, max_seq_len=16)
    return ModelConfig(**{**settings, **overrides})


def test_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Decoder(small_config())
    tokens = torch.randint(0, 64, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 64
    torch.testing.assert_close(model(tokens)[:, :8], model(changed)[:, :8])
    assert not torch.allclose(model(tokens)[:, 8:], model(changed)[:, 8:])


def test_grouped_query_attention_shapes_and_no_biases():
    model = Decoder(small_config(num_heads=4, num_kv_heads=1))
    attention = model.layers[0].self_attn
    assert attention.k_proj.weight.shape == (8, 32)  # one KV head of head_dim 8
    assert attention.q_proj.weight.shape == (32, 32)
    assert all(not name.endswith("bias") for name, _ in model.named_parameters())


def test_output_layer_is_the_input_embedding():
    model = Decoder(small_config())
    names = [name for name, _ in model.named_parameters()]
    assert not any("lm_head" in name for name in names)
    tokens = torch.randint(0, 64, (1, 5))
    loss = model(tokens).sum()
    loss.backward()
    assert model.embed_tokens.weight.grad is not None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=30, num_heads=4), "hidden_size=30 is not divisible by num_heads=4"),
        (dict(num_heads=4, num_kv_heads=3), "num_heads=4 is not divisible by num_kv_heads=3"),
        (dict(num_layers=0), "num_layers=0 must be a positive integer"),
    ],
)
def test_bad_shapes_are_refused_with_the_bad_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_sequences_longer_than_the_context_are_refused():
    model = Decoder(small_config(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
