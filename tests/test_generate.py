"""Generation: the KV cache gives the full forward pass's logits, batched left-padded decoding
gives what each prompt gives alone, greedy decoding is deterministic, sampling is seeded."""

import pytest
import torch

from tests.test_cli import xm2
from xm2.config import ModelConfig
from xm2.eval.generate import (
    context_budget,
    context_notes,
    cut_at_stop,
    generate,
    generate_ids,
)
from xm2.eval.load import load_checkpoint_model
from xm2.model import Decoder


@pytest.fixture(scope="module")
def model() -> Decoder:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=80, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_seq_len=32)
    return Decoder(config).eval()


def test_cached_logits_equal_the_full_forward_pass(model):
    tokens = torch.randint(0, 64, (3, 20))
    cache = model.new_cache(3)
    pieces = [model(tokens[:, :9], cache), model(tokens[:, 9:10], cache), model(tokens[:, 10:], cache)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(tokens), atol=1e-5, rtol=1e-5)
    assert cache.length == 20


def test_a_left_padded_row_gives_what_the_row_gives_alone(model):
    tokens = torch.randint(0, 64, (2, 12))
    cache = model.new_cache(2)
    cache.valid[1, :5] = False  # row 1 is a 7-token prompt after 5 padding positions
    batched = model(tokens, cache)
    assert batched.isfinite().all()
    torch.testing.assert_close(batched[1, 5:], model(tokens[1:, 5:])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[0], model(tokens[:1])[0], atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_the_cache_equals_generation_without(model):
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (3, 11, 7, 1, 11)]
    cached = generate_ids(model, prompts, max_new_tokens=12, eos_id=None, batch_size=4)
    uncached = generate_ids(model, prompts, max_new_tokens=12, eos_id=None, use_cache=False)
    assert cached == uncached
    assert all(len(new) == 12 for new in cached)
    assert generate_ids(model, prompts, max_new_tokens=12, eos_id=None, batch_size=2) == cached


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy(model):
    prompts = [[1, 2, 3], [4, 5]]
    first = generate_ids(model, prompts, 16, temperature=1.0, seed=3, eos_id=None)
    assert first == generate_ids(model, prompts, 16, temperature=1.0, seed=3, eos_id=None)
    assert first != generate_ids(model, prompts, 16, temperature=1.0, seed=4, eos_id=None)
    greedy = generate_ids(model, prompts, 16, eos_id=None)
    assert generate_ids(model, prompts, 16, temperature=1.0, top_p=1e-6, eos_id=None) == greedy


def test_generation_stops_at_eos_and_respects_the_context(model):
    greedy = generate_ids(model, [[1, 2, 3]], 8, eos_id=None)[0]
    # The first greedy token as the "EOS": generation stops before it.
    assert generate_ids(model, [[1, 2, 3]], 8, eos_id=greedy[0]) == [[]]
    # A 30-token prompt in a 32-token context asking for 20 tokens keeps 16 and gets 16.
    assert context_budget(30, 20, 32) == (16, 16)
    assert context_budget(5, 20, 32) == (5, 20)
    long = generate_ids(model, [list(range(1, 31))], 20, eos_id=None)
    assert len(long[0]) == 16


def test_bad_sampling_settings_are_refused(model):
    with pytest.raises(ValueError, match="top_p=1.5"):
        generate_ids(model, [[1]], 2, top_p=1.5)
    with pytest.raises(ValueError, match="temperature=-1"):
        generate_ids(model, [[1]], 2, temperature=-1)


def test_text_generation_cuts_at_stop_strings(tiny_checkpoint):
    loaded = load_checkpoint_model(tiny_checkpoint)
    free = generate(loaded.model, loaded.tokenizer, ["The river", "Once"], max_new_tokens=20)
    assert free == generate(loaded.model, loaded.tokenizer, ["The river", "Once"],
                            max_new_tokens=20, use_cache=False)
    stop = free[0][3:5]
    cut = generate(loaded.model, loaded.tokenizer, ["The river"], max_new_tokens=20, stop=[stop])[0]
    assert cut == cut_at_stop(free[0], [stop])[0] and stop not in cut


def test_generate_command(tiny_checkpoint, tmp_path):
    result = xm2("generate", str(tiny_checkpoint), "--prompt", "[The river,Once]",
                 "--max_new_tokens", "5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The river")
    missing = xm2("generate", "nowhere.ckpt", "--prompt", "[x]", cwd=tmp_path)
    assert missing.returncode == 1 and "checkpoint nowhere.ckpt does not exist" in missing.stderr


def test_a_prompt_cut_to_the_context_is_announced(tiny_checkpoint, tokenizer_path, tmp_path):
    from xm2.data.tokenizer import load_tokenizer

    long = "The river runs past the mill and under the old stone bridge. " * 8
    length = len(load_tokenizer(tokenizer_path).encode(long))
    assert length > 64  # the tiny model's context
    result = xm2("generate", str(tiny_checkpoint), "--prompt", long, "--max_new_tokens", "8",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # 56 prompt tokens and 8 new ones fill the context of 64; the boundary token goes first.
    assert (f"xm2: note: the prompt has {length} tokens and the model's context is 64: its "
            f"oldest {length - 56} tokens were dropped, the last 56 kept, and it gets 8 new "
            "tokens") in result.stderr.splitlines()
    assert result.stdout.startswith(long)
    # Several prompts are numbered; one that fits says nothing; fewer new tokens are said too.
    assert context_notes([5, 40, 60], 64, 64) == [
        "xm2: note: prompt 1 gets 58 new tokens of the 64 asked for: with its 5 tokens the "
        "model's context of 64 has no room for more",
        "xm2: note: prompt 2 has 40 tokens and the model's context is 64: its oldest 8 tokens "
        "were dropped, the last 32 kept, and it gets 32 new tokens of the 64 asked for",
        "xm2: note: prompt 3 has 60 tokens and the model's context is 64: its oldest 28 tokens "
        "were dropped, the last 32 kept, and it gets 32 new tokens of the 64 asked for"]
    assert context_notes([5], 8, 64) == []


def test_the_continuation_keeps_its_word_boundary_space(tokenizer_path):
    from xm2.data.tokenizer import load_tokenizer
    from xm2.eval.generate import decode_continuation

    tokenizer = load_tokenizer(tokenizer_path)
    ids = tokenizer.encode("river is")  # SentencePiece starts a text with a word boundary
    assert tokenizer.decode(ids) == "river is"
    assert decode_continuation(tokenizer, ids) == " river is"
    assert decode_continuation(tokenizer, []) == ""
