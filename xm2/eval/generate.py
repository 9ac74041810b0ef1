"""Text generation from an xm2 decoder: greedy or nucleus sampling, with a KV cache.

Prompts start after a document boundary (EOS), as every training document does, and are batched
left-padded: the cache marks the padding as keys no query may see, and RoPE makes attention depend
only on distances, so a prompt gives the same continuation alone or in a batch. Greedy decoding
(``temperature=0``) is deterministic; sampling draws from a generator seeded by ``seed``.

The model never sees more than its context (``max_seq_len``, 128 tokens for nano): a prompt that
leaves no room for the new tokens loses its oldest tokens, down to half the context, and then the
number of new tokens shrinks instead (:func:`context_budget`).

    xm2 generate <checkpoint> --prompt "Question: ..." [--temperature 0.8 --top_p 0.95]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch

from xm2.data.tokenizer import EOS_ID
from xm2.errors import ConfigError
from xm2.model import Decoder


def context_budget(prompt_tokens: int, max_new_tokens: int, context: int) -> tuple[int, int]:
    """How many prompt tokens to keep (the most recent) and how many new tokens to generate.

    The new tokens get the room they ask for as long as the prompt keeps at least half the
    context (or all of itself, if shorter); a longer prompt is cut to ``context - new``.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if prompt_tokens < 1:
        raise ValueError("a prompt needs at least one token")
    reserve = min(prompt_tokens, context // 2)
    new = min(max_new_tokens, context - reserve)
    return min(prompt_tokens, context - new), new


def context_notes(prompt_lengths: Sequence[int], max_new_tokens: int, context: int) -> list[str]:
    """One note for each prompt that :func:`context_budget` cuts or gives fewer new tokens than
    asked; ``prompt_lengths`` count each prompt's tokens without the boundary token."""
    notes = []
    for index, length in enumerate(prompt_lengths, start=1):
        keep, new = context_budget(1 + length, max_new_tokens, context)
        label = "the prompt" if len(prompt_lengths) == 1 else f"prompt {index}"
        dropped = max(0, length - keep)  # the boundary token goes first, then the oldest
        gets = f"{new} new tokens" + (f" of the {max_new_tokens} asked for"
                                      if new < max_new_tokens else "")
        if dropped:
            notes.append(f"xm2: note: {label} has {length} tokens and the model's context is "
                         f"{context}: its oldest {dropped} tokens were dropped, the last "
                         f"{length - dropped} kept, and it gets {gets}")
        elif new < max_new_tokens:
            notes.append(f"xm2: note: {label} gets {gets}: with its {length} tokens the model's "
                         f"context of {context} has no room for more")
    return notes


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of (batch, vocab) ``logits``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always >= 1 token).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0.0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]")


@torch.inference_mode()
def generate_ids(model: Decoder, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, eos_id: int | None = EOS_ID,
                 seed: int = 0, batch_size: int = 8, use_cache: bool = True,
                 should_stop=None) -> list[list[int]]:
    """New token ids after each prompt (the prompts' ids include any boundary token).

    Args:
        model: The decoder (eval mode).
        prompt_ids: One id list per prompt.
        max_new_tokens: At most this many new tokens per prompt (fewer if the context is full).
        temperature: 0 for greedy decoding; otherwise the softmax temperature.
        top_p: Nucleus sampling: sample among the most likely tokens holding this much mass.
        eos_id: Stop a sequence after this token (which is dropped); None never stops on a token.
        seed: Seed of the sampling generator.
        batch_size: Prompts decoded together.
        use_cache: False recomputes the whole sequence at every step, one prompt at a time (the
            reference the cached path is tested against).
        should_stop: ``should_stop(index, new_ids) -> bool``, asked after every token of prompt
            ``index``: stop sequences in text.
    """
    _check_sampling(temperature, top_p)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    context = model.config.max_seq_len
    device = model.embed_tokens.weight.device
    generator = None
    if temperature > 0.0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    fitted = []
    for ids in prompt_ids:
        keep, new = context_budget(len(ids), max_new_tokens, context)
        fitted.append((list(ids[len(ids) - keep:]), new))
    results: list[list[int]] = [[] for _ in fitted]
    if not use_cache:
        batch_size = 1
    for chunk in _batches(fitted, batch_size, context):
        decode = _decode_cached if use_cache else _decode_uncached
        for index, new_ids in zip(chunk, decode(model, [fitted[i] for i in chunk], chunk,
                                                temperature, top_p, eos_id, generator,
                                                should_stop, device), strict=True):
            results[index] = new_ids
    return results


def _batches(fitted: list[tuple[list[int], int]], batch_size: int, context: int) -> list[list[int]]:
    """Prompt indices in batches of similar length (less padding) whose longest prompt and
    longest continuation fit the context together: rows share positions."""
    batches: list[list[int]] = []
    width = steps = 0
    for index in sorted(range(len(fitted)), key=lambda i: len(fitted[i][0])):
        ids, new = fitted[index]
        if batches and len(batches[-1]) < batch_size and max(width, len(ids)) + max(steps, new) <= context:
            batches[-1].append(index)
            width, steps = max(width, len(ids)), max(steps, new)
        else:
            batches.append([index])
            width, steps = len(ids), new
    return batches


def _decode_cached(model, fitted, indices, temperature, top_p, eos_id, generator, should_stop,
                   device) -> list[list[int]]:
    width = max(len(ids) for ids, _ in fitted)
    steps = max(new for _, new in fitted)
    batch = torch.zeros(len(fitted), width, dtype=torch.long)
    cache = model.new_cache(len(fitted), width + steps)
    for row, (ids, _) in enumerate(fitted):
        batch[row, width - len(ids):] = torch.tensor(ids)
        cache.valid[row, :width - len(ids)] = False
    logits = model(batch.to(device), cache)[:, -1]
    outputs: list[list[int]] = [[] for _ in fitted]
    active = [True] * len(fitted)
    for step in range(steps):
        tokens = _next_tokens(logits, temperature, top_p, generator)
        for row, token in enumerate(tokens.tolist()):
            if not active[row]:
                continue
            if token == eos_id:
                active[row] = False
                continue
            outputs[row].append(token)
            if len(outputs[row]) >= fitted[row][1] or (
                    should_stop is not None and should_stop(indices[row], outputs[row])):
                active[row] = False
        if not any(active) or step == steps - 1:
            break
        logits = model(tokens[:, None], cache)[:, -1]
    return outputs


def _decode_uncached(model, fitted, indices, temperature, top_p, eos_id, generator, should_stop,
                     device) -> list[list[int]]:
    ((ids, new),) = fitted
    sequence, output = list(ids), []
    for _ in range(new):
        logits = model(torch.tensor([sequence], device=device))[:, -1]
        token = int(_next_tokens(logits, temperature, top_p, generator)[0])
        if token == eos_id:
            break
        output.append(token)
        sequence.append(token)
        if should_stop is not None and should_stop(indices[0], output):
            break
    return [output]


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def decode_continuation(tokenizer, ids: Sequence[int]) -> str:
    """The text of new tokens as it continues the prompt: SentencePiece's ``decode`` drops the
    word-boundary space of the first piece (``▁Paris`` -> ``Paris``), which here belongs to the
    text (``Answer:`` + `` Paris``)."""
    text = tokenizer.decode(list(ids))
    return " " + text if ids and tokenizer.id_to_piece(ids[0]).startswith("▁") else text


def generate(model: Decoder, tokenizer, prompts: Sequence[str], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = (),
             seed: int = 0, batch_size: int = 8, use_cache: bool = True) -> list[str]:
    """The text each prompt continues with, cut before the first stop string.

    Args:
        model: The decoder (eval mode).
        tokenizer: Its SentencePiece tokenizer.
        prompts: Texts to continue; each starts after a document boundary (EOS).
        max_new_tokens: At most this many new tokens per prompt.
        temperature: 0 for greedy decoding; otherwise the softmax temperature.
        top_p: Nucleus sampling mass.
        stop: Generation of a prompt ends at the first of these strings (not included).
        seed: Seed of the sampling generator.
        batch_size: Prompts decoded together.
        use_cache: Use the KV cache (False: recompute every step; for tests).
    """
    stop = [s for s in stop if s]

    def should_stop(index: int, new_ids: list[int]) -> bool:
        return cut_at_stop(decode_continuation(tokenizer, new_ids), stop)[1]

    prompt_ids = [[EOS_ID, *tokenizer.encode(prompt)] for prompt in prompts]
    new = generate_ids(model, prompt_ids, max_new_tokens, temperature, top_p, EOS_ID, seed,
                       batch_size, use_cache, should_stop if stop else None)
    return [cut_at_stop(decode_continuation(tokenizer, ids), stop)[0] for ids in new]


def generate_command(
    checkpoint: str,
    prompt: list[str] | str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int = 0,
    tokenizer_path: str | None = None,
) -> list[str]:
    """Continue prompts with a checkpoint's model (KV cache; greedy unless temperature > 0).

    Args:
        checkpoint: An xm2 checkpoint (.ckpt).
        prompt: The prompt; a list (`--prompt '[one,two]'`) decodes several in a batch.
        max_new_tokens: At most this many new tokens per prompt; the model's context bounds it.
        temperature: 0 gives greedy decoding (deterministic); otherwise the sampling temperature.
        top_p: Nucleus sampling: sample among the most likely tokens holding this probability mass.
        stop: Stop a prompt's continuation at the first of these strings.
        seed: Seed for sampling.
        tokenizer_path: The tokenizer, if not the one the checkpoint's record names.
    """
    from xm2.eval.load import load_checkpoint_model

    if not prompt:
        raise ConfigError("no prompt: give one with --prompt 'Once upon a time'")
    prompt = [prompt] if isinstance(prompt, str) else prompt
    loaded = load_checkpoint_model(checkpoint, tokenizer_path=tokenizer_path)
    lengths = [len(loaded.tokenizer.encode(text)) for text in prompt]
    for note in context_notes(lengths, max_new_tokens, loaded.config.max_seq_len):
        print(note, file=sys.stderr, flush=True)
    texts = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens, temperature, top_p,
                     stop or (), seed)
    for text_in, text_out in zip(prompt, texts, strict=True):
        print(f"{text_in}{text_out}\n")
    return texts
