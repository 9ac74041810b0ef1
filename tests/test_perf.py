"""The speed paths compute what the plain ones do: the decoder (CPU bf16 attention, residual adds
with alpha, the logit scale on the last hidden state) against a by-the-book reference, and
compiled against eager (whole model, per block)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from xm2.config import ModelConfig
from xm2.model import Decoder, apply_rope, causal_attention
from xm2.parallel import ParallelConfig, apply


def small_config(**overrides) -> ModelConfig:
    # m = 2 (a power of two, as in every preset): the logit scaling moved onto h is exact.
    settings = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=2,
                    num_heads=4, num_kv_heads=2, max_seq_len=32, dim_model_base=32,
                    scale_emb=7.0, scale_depth=1.4)
    return ModelConfig(**{**settings, **overrides})


def reference_logits(model: Decoder, tokens: torch.Tensor) -> torch.Tensor:
    """The decoder written plainly: SDPA, mul-then-add residuals, logits divided by m."""
    config, seq = model.config, tokens.shape[1]
    cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
    h = model.embed_tokens(tokens) * config.scale_emb
    for block in model.layers:
        attention, mlp = block.self_attn, block.mlp
        x = block.input_layernorm(h)
        batch = x.shape[0]

        def heads(projection, count, x=x, batch=batch):
            return projection(x).view(batch, seq, count, config.head_dim).transpose(1, 2)

        q = apply_rope(heads(attention.q_proj, config.num_heads), cos, sin)
        k = apply_rope(heads(attention.k_proj, config.num_kv_heads), cos, sin)
        v = heads(attention.v_proj, config.num_kv_heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        h = h + block.residual_scale * attention.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
        x = block.post_attention_layernorm(h)
        h = h + block.residual_scale * mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    return F.linear(model.norm(h), model.embed_tokens.weight) / config.width_multiplier


def loss_and_grads(model, forward, tokens, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = forward(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return logits.float(), loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_fast_decoder_equals_the_plain_one(bf16):
    torch.manual_seed(0)
    model = Decoder(small_config())
    tokens = torch.randint(0, 96, (3, 33))
    fast = loss_and_grads(model, model, tokens, bf16)
    plain = loss_and_grads(model, lambda t: reference_logits(model, t), tokens, bf16)
    # fp32: rounding only. bf16: the two run different attention kernels on bf16 operands.
    tolerance = dict(rtol=3e-2, atol=3e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[0], plain[0], **tolerance)
    torch.testing.assert_close(fast[1], plain[1], **tolerance)
    for name, grad in fast[2].items():
        scale = plain[2][name].abs().max()
        torch.testing.assert_close(grad / scale, plain[2][name] / scale, **tolerance, msg=name)


def test_cpu_bf16_attention_is_as_accurate_as_sdpa_in_bf16():
    """Against fp32 SDPA, the bf16 matmul attention errs no more than bf16 SDPA (which it
    replaces on CPUs), in the output and in each gradient."""
    torch.manual_seed(0)
    q = torch.randn(2, 6, 40, 16, requires_grad=True)
    k = torch.randn(2, 2, 40, 16, requires_grad=True)
    v = torch.randn(2, 2, 40, 16, requires_grad=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    upstream = torch.randn_like(expected)
    expected.backward(upstream)
    exact = [expected, q.grad, k.grad, v.grad]

    def errors(attention):
        low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        out = attention(*low)
        assert out.dtype == torch.bfloat16
        out.backward(upstream.bfloat16())
        got = [out, *(t.grad for t in low)]
        return [((g.float() - e).abs().max() / e.abs().max()).item()
                for g, e in zip(got, exact, strict=True)]

    ours = errors(causal_attention)
    sdpa = errors(lambda *qkv: F.scaled_dot_product_attention(*qkv, is_causal=True,
                                                               enable_gqa=True))
    assert max(ours) < 0.02
    for mine, theirs in zip(ours, sdpa, strict=True):
        assert mine <= 1.5 * theirs + 1e-3, (ours, sdpa)


def test_compile_switch_accepts_whole_model_blocks_or_off():
    assert ParallelConfig(compile="model").compile == "model"
    assert ParallelConfig(compile=True).compile is True
    with pytest.raises(ValueError, match="allowed: false, true, blocks .* model"):
        ParallelConfig(compile="graph")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_compiled_decoder_equals_eager(mode):
    torch.manual_seed(0)
    eager = Decoder(small_config())
    compiled = copy.deepcopy(eager)
    apply(compiled, ParallelConfig(compile=mode), None, torch.device("cpu"))
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    tokens = torch.randint(0, 96, (2, 33))
    # bf16 autocast (the recipe's precision) on the whole model; per block fp32 only, to keep the
    # compile time of the suite down.
    for bf16 in (False, True) if mode == "model" else (False,):
        expected = loss_and_grads(eager, eager, tokens, bf16)
        got = loss_and_grads(compiled, compiled, tokens, bf16)
        tolerance = dict(rtol=3e-2, atol=3e-2) if bf16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], expected[1], **tolerance)
        for name, grad in got[2].items():
            scale = expected[2][name].abs().max()
            torch.testing.assert_close(grad / scale, expected[2][name] / scale, **tolerance,
                                       msg=name)
