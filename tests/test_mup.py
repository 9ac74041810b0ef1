"""Each µP rule of Xmodel-2's Table 6, checked where the model and optimizer apply it."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from xm2 import mup
from xm2.config import ModelConfig
from xm2.model import Decoder
from xm2.mup import Role
from xm2.schedule import WSDSchedule


def config(**overrides) -> ModelConfig:
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_layers=4,
                    num_heads=4, num_kv_heads=2, max_seq_len=16, dim_model_base=16,
                    scale_emb=7.0, scale_depth=2.0, init_std=0.1)
    return ModelConfig(**{**settings, **overrides})


def capture(module: torch.nn.Module, outputs: list, inputs: bool = False):
    def hook(_, args, output):
        outputs.append(args[0] if inputs else output)
    return module.register_forward_hook(hook)


def test_width_multiplier_is_width_over_base_and_one_without_mup():
    assert config().width_multiplier == 4.0
    assert config(use_mup=False).width_multiplier == 1.0


def test_rule1_embedding_output_is_scaled_by_scale_emb():
    model = Decoder(config())
    tokens = torch.randint(0, 128, (2, 8))
    seen = []
    capture(model.layers[0], seen, inputs=True)
    model(tokens)
    torch.testing.assert_close(seen[0], model.embed_tokens(tokens) * 7.0)


def test_rule2_branch_outputs_are_scaled_before_the_residual_add():
    model = Decoder(config())
    block = model.layers[1]
    block_in, attention_out, mlp_in, mlp_out, block_out = [], [], [], [], []
    capture(block, block_in, inputs=True)
    capture(block.self_attn, attention_out)
    capture(block.post_attention_layernorm, mlp_in, inputs=True)
    capture(block.mlp, mlp_out)
    capture(block, block_out)
    model(torch.randint(0, 128, (2, 8)))
    residual_scale = 2.0 / math.sqrt(4)
    torch.testing.assert_close(mlp_in[0], block_in[0] + residual_scale * attention_out[0])
    torch.testing.assert_close(block_out[0], mlp_in[0] + residual_scale * mlp_out[0])


def test_rule5_logits_are_the_tied_readout_divided_by_m():
    model = Decoder(config())
    final_hidden = []
    capture(model.norm, final_hidden)
    logits = model(torch.randint(0, 128, (2, 8)))
    expected = F.linear(final_hidden[0], model.embed_tokens.weight) / 4.0
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("use_mup, hidden_std", [(True, 0.1 / 2), (False, 0.1)])
def test_rule3_init_std_follows_the_role(use_mup, hidden_std):
    torch.manual_seed(0)
    model = Decoder(config(hidden_size=256, intermediate_size=640, num_heads=4, num_kv_heads=4,
                           dim_model_base=64, use_mup=use_mup))  # m = 4 under µP
    for name, parameter in model.named_parameters():
        role = mup.parameter_role(name)
        if role is Role.VECTOR:
            assert torch.all(parameter == 1.0), name
        else:
            expected = hidden_std if role is Role.HIDDEN else 0.1
            assert parameter.std().item() == pytest.approx(expected, rel=0.05), name


def test_rule4_hidden_matrices_learn_at_lr_over_m_through_the_whole_schedule():
    model = Decoder(config())
    groups = mup.param_groups(model.named_parameters(), config(), lr=0.02, weight_decay=0.1)
    by_name = {group["name"]: group for group in groups}
    assert by_name["hidden"]["lr"] == pytest.approx(0.02 / 4)
    assert by_name["embedding"]["lr"] == pytest.approx(0.02)
    assert by_name["vector"]["lr"] == pytest.approx(0.02)
    assert by_name["vector"]["weight_decay"] == 0.0
    assert by_name["hidden"]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    optimizer = torch.optim.AdamW(groups)
    schedule = WSDSchedule(warmup_steps=3, decay_start_step=5, decay_style="linear")
    scheduler = LambdaLR(optimizer, lambda step: schedule.lr_factor(step, 10))
    for step in range(10):
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert lrs["hidden"] == pytest.approx(lrs["embedding"] / 4)
        assert lrs["embedding"] == pytest.approx(0.02 * schedule.lr_factor(step, 10))
        optimizer.step()
        scheduler.step()


def test_changing_width_alone_rescales_init_and_lr():
    narrow, wide = config(hidden_size=64), config(hidden_size=256, intermediate_size=640)
    assert mup.lr_multiplier(Role.HIDDEN, wide) == pytest.approx(mup.lr_multiplier(Role.HIDDEN, narrow) / 4)
    assert mup.init_std(Role.HIDDEN, wide) == pytest.approx(mup.init_std(Role.HIDDEN, narrow) / 2)
    assert mup.init_std(Role.EMBEDDING, wide) == mup.init_std(Role.EMBEDDING, narrow)


@pytest.mark.parametrize(
    "name, role",
    [
        ("embed_tokens.weight", Role.EMBEDDING),
        ("model.layers.3.self_attn.k_proj.weight", Role.HIDDEN),
        ("_orig_mod.model.layers.0.mlp.down_proj.weight", Role.HIDDEN),
        ("_fsdp_wrapped_module.layers.0.input_layernorm.weight", Role.VECTOR),
        ("model.norm.weight", Role.VECTOR),
    ],
)
def test_roles_come_from_names_whatever_the_wrapper_prefix(name, role):
    assert mup.parameter_role(name) is role


@pytest.mark.parametrize("name", ["lm_head.weight", "layers.0.self_attn.q_proj.bias", "scale"])
def test_unknown_parameters_are_refused_by_name(name):
    with pytest.raises(ValueError, match="has no µP role"):
        mup.parameter_role(name)


def test_roles_survive_torch_compile_wrapping():
    model = Decoder(config())
    compiled = torch.compile(model)
    groups = mup.param_groups(compiled.named_parameters(), config(), lr=0.01, weight_decay=0.0)
    assert {g["name"] for g in groups} == {"embedding", "hidden", "vector"}
