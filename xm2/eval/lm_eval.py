"""lm-evaluation-harness on xm2 checkpoints, with no conversion step.

:class:`Xm2LM` is an lm-eval model over an xm2 checkpoint (through
:func:`xm2.eval.load.load_checkpoint_model`) and its SentencePiece tokenizer:

- ``loglikelihood`` scores through xm2's multiple-choice engine
  (:func:`xm2.analysis.multiple_choice.score_requests`: batches sorted by length, one forward pass
  for requests with the same input). Every context starts after a document boundary (EOS), as every
  training document does; a sequence longer than the model's context loses its oldest tokens, and
  the last continuation token is never an input. A continuation longer than the context is scored
  in windows of the context, each token once.
- ``loglikelihood_rolling`` scores a whole text in disjoint windows of the model's context, each
  token exactly once, the first after the boundary token (lm-eval's own windowing, as its
  Hugging Face model does).
- ``generate_until`` decodes with :func:`xm2.eval.generate.generate` (KV cache): ``until`` are stop
  strings, ``max_gen_toks`` the new-token budget; greedy unless ``do_sample`` is true (or absent
  with ``temperature > 0``).

lm-eval 0.4.13 finds models only in its own registry (no entry points are read), so ``xm2`` is
registered when this module is imported, and ``python -m xm2.eval.lm_eval <lm-eval arguments>``
is lm-eval's own command line with ``xm2`` registered::

    python -m xm2.eval.lm_eval --model xm2 --model_args checkpoint=<ckpt>,batch_size=8 \\
        --tasks <task or task.yaml> [--include_path <folder of task YAMLs>]

From Python, :func:`multiple_choice_task` turns a local multiple-choice JSONL (xm2's format,
``data/eval/*.jsonl.gz``) and :func:`text_task` a JSONL of documents into an lm-eval task config
(:func:`write_task_yaml` writes it for the command line), and :func:`evaluate_tasks` runs
``simple_evaluate`` offline without reseeding the global random generators.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry

from xm2.analysis.multiple_choice import LETTERS, score_requests
from xm2.errors import ConfigError, MissingFileError

MODEL_NAME = "xm2"
OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")

log = logging.getLogger(__name__)


def register() -> None:
    """Make ``--model xm2`` known to lm-eval (idempotent; done on import of this module).

    The registry gets the class's import path, not the class, so running this file as
    ``python -m`` (a second copy of the module, ``__main__``) registers the same model.
    """
    # lm-eval fills its registry with its own models only when the registry is empty: fill it
    # first, or registering xm2 alone would hide them.
    import lm_eval.models  # noqa: F401

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=f"{__spec__.name}:Xm2LM")


def continuation_windows(context: list[int], continuation: list[int],
                         max_len: int) -> list[tuple[list[int], int]]:
    """``(ids, n)`` windows that score each continuation token once with the most context.

    Each ``ids`` has at most ``max_len + 1`` tokens (the model sees all but the last) and its
    last ``n`` tokens are scored. A continuation that fits the context is one window:
    ``(context + continuation)[-(max_len + 1):]``.
    """
    if not context:
        raise ValueError("a continuation needs at least one context token before it")
    sequence = context + continuation
    windows, end = [], len(sequence)
    while end > len(context):
        scored = min(max_len, end - len(context))
        windows.append((sequence[max(0, end - max_len - 1):end], scored))
        end -= scored
    return windows[::-1]


def _batch_size(value: int | str | None) -> int:
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("xm2: batch_size=%s is not supported; using %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ConfigError(f"batch_size={value} must be >= 1")
    return size


def resolve_device(device: str | None) -> str:
    """The device to load on: cuda if there is one and none was named; cpu in place of cuda
    where there is none (lm-eval's command line asks for ``cuda:0`` unless told otherwise)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("xm2: device=%s but torch sees no CUDA device; using cpu", device)
        return "cpu"
    return device


class Xm2LM(TemplateLM):
    """An xm2 decoder and its SentencePiece tokenizer as an lm-eval model.

    Args:
        checkpoint: An xm2 checkpoint (``.ckpt``), loaded and verified by
            :func:`xm2.eval.load.load_checkpoint_model`.
        batch_size: Sequences per forward pass (scoring) or prompts decoded together.
        device: ``cpu``, ``cuda``, ``cuda:1``, ... (default: cuda if available, else cpu; cuda
            without a CUDA device falls back to cpu with a warning).
        dtype: ``float32`` (default, as saved), ``bfloat16`` or ``float16``.
        tokenizer_path: The tokenizer, if not where the checkpoint's record says.
        seed: Seed of the sampling generator for ``generate_until`` with sampling.
        max_batch_size: Accepted for lm-eval's command line; not used.
        model, tokenizer: An in-memory decoder and tokenizer instead of ``checkpoint``
            (see :meth:`from_model`).
    """

    def __init__(self, checkpoint: str | None = None, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 device: str | None = None, dtype: str | None = None,
                 tokenizer_path: str | None = None, seed: int = 0,
                 max_batch_size: int | None = None, *, model: torch.nn.Module | None = None,
                 tokenizer: Any = None) -> None:
        super().__init__()
        self.batch_size = _batch_size(batch_size)
        self.seed = int(seed)
        self.info: dict[str, Any] = {}
        if (checkpoint is None) == (model is None):
            raise ConfigError("Xm2LM needs either checkpoint=<path of an xm2 .ckpt> or model= and "
                              "tokenizer= (not both)")
        if model is None:
            from xm2.eval.load import load_checkpoint_model

            if dtype is not None and dtype not in DTYPES:
                raise ConfigError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
            device = resolve_device(device)
            loaded = load_checkpoint_model(checkpoint, device=device,
                                           dtype=DTYPES.get(dtype) if dtype else None,
                                           tokenizer_path=tokenizer_path)
            model, tokenizer = loaded.model, loaded.tokenizer
            self.info = {"checkpoint": str(loaded.path), "global_step": loaded.global_step,
                         "run_id": loaded.record.get("run_id"),
                         "tokenizer_path": str(loaded.tokenizer_path)}
        elif tokenizer is None:
            raise ValueError("Xm2LM(model=...) needs the model's tokenizer= too")
        self.model = model  # an in-memory model's train/eval mode is its owner's business
        self.tokenizer = tokenizer
        self.max_length = model.config.max_seq_len
        # lm-eval's results record its own --batch_size and --device, which xm2 may override.
        self.info.update(max_seq_len=self.max_length, model_batch_size=self.batch_size,
                         model_device=str(next(model.parameters()).device))

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any,
                   batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> Xm2LM:
        """An in-memory decoder (e.g. the one being trained; put it in eval mode if it has
        layers that differ in training) and its SentencePiece tokenizer."""
        return cls(model=model, tokenizer=tokenizer, batch_size=batch_size, seed=seed)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Xm2LM:
        """``--model_args``; they win over lm-eval's own options (its ``--batch_size`` defaults
        to 1, which would otherwise clash with ``batch_size=`` in the model args)."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> Xm2LM:
        import inspect

        allowed = [name for name, parameter in inspect.signature(cls).parameters.items()
                   if parameter.kind is parameter.POSITIONAL_OR_KEYWORD]
        unknown = sorted(set(arg_dict) - set(allowed))
        if unknown:
            raise ConfigError(f"--model_args {', '.join(unknown)}: not an xm2 model argument; "
                              f"allowed: {', '.join(allowed)}")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # What lm-eval asks of a model.

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id()

    @property
    def prefix_token_id(self) -> int:
        # The document boundary: xm2 trains on documents each followed by EOS.
        return self.tokenizer.eos_id()

    @property
    def tokenizer_name(self) -> str:
        return self.info.get("tokenizer_path", "xm2-sentencepiece")

    def get_model_info(self) -> dict:
        """Recorded by lm-eval in its results' config."""
        return dict(self.info)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # lm-eval encodes context + continuation together and splits (the continuation's first
        # word keeps its tokenization in running text); the context then follows a boundary.
        context_ids, continuation_ids = super()._encode_pair(context, continuation)
        return [self.prefix_token_id, *context_ids], continuation_ids

    def _score(self, windows: list[list[tuple[list[int], int]]]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities and greedy flag of each request, scored by its windows."""
        flat = [window for request in windows for window in request]
        if not flat:
            return [(0.0, True)] * len(windows)
        scores, greedy = score_requests(self.model, flat, self.batch_size, return_greedy=True)
        results, start = [], 0
        for request in windows:
            stop = start + len(request)
            results.append((float(scores[start:stop].sum()), bool(greedy[start:stop].all())))
            start = stop
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = self._score([continuation_windows(list(context), list(continuation),
                                                    self.max_length)
                               for _, context, continuation in requests])
        for (key, _, _), answer in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = []
        for (text,) in (request.args for request in requests):
            pairs = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            windows.append([(context + scored, len(scored)) for context, scored in pairs])
        results = [score for score, _ in self._score(windows)]
        for request, score in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, score)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from xm2.eval.generate import generate

        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        outputs: list[str] = [""] * len(requests)
        for indices in groups.values():
            settings = sampling_settings(requests[indices[0]].args[1])
            texts = generate(self.model, self.tokenizer, [requests[i].args[0] for i in indices],
                             seed=self.seed, batch_size=self.batch_size, **settings)
            for index, text in zip(indices, texts, strict=True):
                outputs[index] = text
                self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return outputs


def sampling_settings(gen_kwargs: dict | None) -> dict:
    """lm-eval's ``gen_kwargs`` as :func:`xm2.eval.generate.generate` arguments.

    ``until`` (a string or a list) are stop strings; ``max_gen_toks`` the new-token budget
    (default 256, bounded by the model's context); sampling happens when ``do_sample`` is true,
    or when it is absent and ``temperature > 0`` (temperature 1 if ``do_sample`` is true without
    one); otherwise decoding is greedy.
    """
    kwargs = dict(gen_kwargs or {})
    unknown = sorted(set(kwargs) - set(GEN_KWARGS))
    if unknown:
        log.warning("xm2: ignoring generation settings %s (xm2 knows %s)", unknown, list(GEN_KWARGS))
    until = kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    do_sample = kwargs.get("do_sample")
    if do_sample is None:
        do_sample = temperature > 0.0
    if not do_sample:
        temperature = 0.0
    elif temperature == 0.0:
        temperature = 1.0
    return {"max_new_tokens": int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
            "temperature": temperature, "top_p": float(kwargs.get("top_p", 1.0) or 1.0),
            "stop": list(until)}


def multiple_choice_task(path: str | Path, name: str | None = None, format: str = "cloze",
                         continuation_style: bool = False) -> dict:
    """An lm-eval task config over a local multiple-choice JSONL in xm2's format.

    The file (``.jsonl`` or ``.jsonl.gz``) has one ``{"question", "choices", "gold" (an index),
    "subject" (optional)}`` object a line, as in ``data/eval/``. The prompts are those of
    :mod:`xm2.analysis.multiple_choice`: ``cloze`` scores each answer text after
    ``Question: ...\\nAnswer:`` (metrics ``acc`` and ``acc_norm``, per character; xm2's cloze
    accuracy is per UTF-8 byte, the same for ASCII); ``letter`` lists the options as ``A. ...`` and
    scores the letters (MMLU). ``continuation_style`` (cloze) drops the ``Question:`` frame, for
    sets that give a passage to continue (HellaSwag). The data path is made absolute: lm-eval
    resolves relative paths against the working directory.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise MissingFileError(f"multiple-choice file {path} does not exist")
    if format not in ("cloze", "letter"):
        raise ConfigError(f"format={format!r}; allowed: cloze, letter")
    name = name or f"xm2_{path.name.split('.')[0]}_{format}"
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "fewshot_split": "test",
        "output_type": "multiple_choice",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if format == "cloze":
        config["doc_to_text"] = ("{{question | trim}}" if continuation_style
                                 else "Question: {{question | trim}}\nAnswer:")
        config["doc_to_choice"] = "{{choices | map('trim') | list}}"
    else:
        config["description"] = ("{% if subject is defined and subject %}The following are "
                                 "multiple choice questions (with answers) about "
                                 "{{subject | replace('_', ' ')}}.\n\n{% endif %}")
        config["doc_to_text"] = ("{{question | trim}}{% for choice in choices %}\n"
                                 f"{{{{'{LETTERS}'[loop.index0]}}}}. {{{{choice}}}}"
                                 "{% endfor %}\nAnswer:")
        config["doc_to_choice"] = f"{{{{'{LETTERS}'[:choices | length] | list}}}}"
    return config


def text_task(path: str | Path, name: str | None = None, text_field: str = "text") -> dict:
    """An lm-eval perplexity task over a local JSONL of documents (``{"text": ...}`` a line, as
    the corpus's ``val.jsonl.gz``): each document scored whole by ``loglikelihood_rolling``;
    metrics ``word_perplexity``, ``byte_perplexity`` and ``bits_per_byte``, as lm-eval's
    wikitext task."""
    path = Path(path).resolve()
    if not path.is_file():
        raise MissingFileError(f"text file {path} does not exist")
    return {
        "task": name or f"xm2_{path.parent.name}_{path.name.split('.')[0]}_text",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": f"{{{{{text_field}}}}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                        {"metric": "bits_per_byte"}],
        "metadata": {"version": 1.0},
    }


def write_task_yaml(config: dict, folder: str | Path) -> Path:
    """Write a task config as ``<folder>/<task>.yaml``, for lm-eval's ``--include_path`` or
    ``--tasks <file>``."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config['task']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def evaluate_tasks(model: Xm2LM, tasks: list, num_fewshot: int | None = 0,
                   limit: int | float | None = None, bootstrap_iters: int = 0,
                   log_samples: bool = False, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` for training-time or scripted use: offline, own tasks only.

    Sets ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` (unless already set) before ``datasets`` is
    imported, leaves the global random generators alone (lm-eval reseeds ``random``, numpy and
    torch by default, which would change a training run's random stream), and indexes no built-in
    tasks (``TaskManager(include_defaults=False)``): ``tasks`` are configs such as
    :func:`multiple_choice_task` returns. Other keyword arguments go to ``simple_evaluate``.
    """
    for variable in OFFLINE_VARIABLES:
        os.environ.setdefault(variable, "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    settings = {"random_seed": None, "numpy_random_seed": None, "torch_random_seed": None,
                "task_manager": TaskManager(include_defaults=False), **kwargs}
    try:
        return simple_evaluate(model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                               bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                               **settings)
    except (KeyError, ValueError) as error:
        unknown = unknown_task_error(error)
        if unknown is None:
            raise
        raise unknown from error


# How lm-eval 0.4.13 words an unknown task: its command line, and its TaskManager.
UNKNOWN_TASK_PATTERNS = (r"^Tasks not found: (?P<names>.+)$",
                         r"^Spec '(?P<names>.+)' is not a registered task/group/tag name")


def unknown_task_error(error: BaseException) -> ConfigError | None:
    """lm-eval's error for a task name it does not know, as one line naming the task and how to
    list the known ones; None for any other error."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    for pattern in UNKNOWN_TASK_PATTERNS:
        found = re.match(pattern, str(text))
        if not found:
            continue
        names = found.group("names").split(", ")
        files = [name for name in names if name.endswith(".yaml")]
        tasks = [name for name in names if name not in files]
        problems = ([f"lm-eval does not know the task{'s' * (len(tasks) > 1)} "
                     f"{', '.join(tasks)}"] if tasks else [])
        problems += [f"task file {name} does not exist" for name in files]
        return ConfigError(
            f"{'; '.join(problems)} (--tasks takes task, group or tag names, or task YAML "
            "files); list the known tasks with `xm2 lm-eval ls tasks`, adding --include_path "
            "<folder> for a folder of your own task YAMLs")
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's own command line (every option of ``lm_eval``) with the xm2 model registered.

    ``argv``: lm-eval's arguments (default: this process's), e.g. ``["--model", "xm2",
    "--model_args", "checkpoint=<ckpt>,batch_size=8", "--tasks", "<task>"]``.
    """
    from lm_eval.__main__ import cli_evaluate

    register()
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except (KeyError, ValueError) as error:
        unknown = unknown_task_error(error)
        if unknown is None:
            raise
        raise unknown from error


register()

if __name__ == "__main__":
    main()
