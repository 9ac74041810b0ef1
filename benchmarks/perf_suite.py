"""The performance suite: ``xm2 fit`` against a raw PyTorch loop and transformers' Llama.

    .venv/bin/python benchmarks/perf_suite.py --quick       # nano, eager, one round: minutes
    .venv/bin/python benchmarks/perf_suite.py               # nano and tiny, fp32/bf16, eager/compiled
    .venv/bin/python benchmarks/perf_suite.py --sizes nano --compile none model --rounds 3
    .venv/bin/python benchmarks/perf_suite.py --baseline 1c1ac36   # + that revision's fit and loop

Each measurement runs in a fresh process, so that start-up and peak memory are its own:

- ``fit``: ``xm2 fit`` on the recipe (config/nano.yaml, with config/model/tiny.yaml for tiny),
  shortened to a few steps with the warmup, the decay start (the LR decay and the mixture switch)
  and the end inside them. µP groups, WSD, the mixture pipeline, MLflow logging (its own store,
  ``artifacts/benchmarks/mlflow.db``), the progress bar, the throughput monitor and checkpoints are
  on. ``benchmarks/perf_probe.py`` times it from inside: tokens/s over the steps after the warmup
  with validation, analyses and checkpoint saves taken out (each is timed on its own), and the
  seconds from launching the command to its first training step. The *recipe* row (nano, bf16,
  eager: what ``make train`` runs) also validates, checkpoints and runs the analyses.
- ``raw`` / ``hf``: benchmarks/perf_loop.py, a plain loop over xm2's decoder / over
  ``transformers.LlamaForCausalLM`` of the same shape, with the same data, AdamW settings and
  clipping.

Compiled rows warm up two steps more (the forward and backward graphs compile in the first two;
"first step s" is that step's own time). ``--baseline REV`` adds the eager ``fit`` and ``raw`` rows
run with the xm2 code of another git revision, in the same rounds.

Rounds are interleaved (every configuration once per round, in turn) and each figure is the
median over rounds, so a machine whose load changes shifts all rows alike. MFU is against a
matmul peak measured in each round in the same dtype (``xm2.analysis.flops.measure_peak_flops``,
2048², the highest of the rounds), with FLOPs from ``xm2.analysis.flops.flops_per_token``.
Also measured: the data pipeline's tokens/s against what training consumes, tokenizer training
and shard writing, and (from the recipe row) validation, each analysis callback and checkpoint
saves as shares of the recipe's training. Prints markdown tables and writes
``artifacts/benchmarks/perf.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
XM2 = str(Path(sys.executable).parent / "xm2")
BATCH = {"nano": 16, "tiny": 4}
"""Rows per batch, as in perf_loop.py (nano: the recipe's 16 × 256 tokens; tiny: 4 × 512)."""
STEPS = {"nano": (3, 8), "tiny": (2, 4)}
"""(warm-up steps, timed steps) of each size; --quick halves them."""
RECIPE = ("nano", "bf16", "none")
"""The row that runs the recipe whole: validation, checkpoints, analyses."""
PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}
RECIPE_STEPS, RECIPE_VALIDATIONS, RECIPE_CHECKPOINTS, RECIPE_ANALYSES = 300, 10, 5, 2
"""config/nano.yaml: 300 steps, validation every 30, a checkpoint every 60, each analysis at the
decay start and at the end."""


def run_process(command: list[str], env: dict | None = None) -> dict:
    """Run ``command`` to its end: its launch wall time, output, exit code and peak RSS (MB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        launched = time.time()
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, env=env, text=True)
        # wait4 gives this child's own resource usage (ru_maxrss: its peak resident set, in KiB).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"launched": launched, "stdout": out.read(), "stderr": err.read(),
                "code": process.returncode, "peak_rss_mb": usage.ru_maxrss / 1024}


def fit_config(size: str, dtype: str, compile_mode: str, warmup: int, steps: int,
               directory: Path, recipe_row: bool) -> Path:
    """The recipe shortened to warmup + steps, written as one YAML file for ``xm2 fit --config``."""
    recipe = yaml.safe_load((ROOT / "config" / "nano.yaml").read_text())
    if size != "nano":
        preset = yaml.safe_load((ROOT / "config" / "model" / f"{size}.yaml").read_text())
        recipe["model"]["architecture"].update(preset["model"]["architecture"])
    config = copy.deepcopy(recipe)
    total = warmup + steps
    trainer = config["trainer"]
    trainer.update(max_steps=total, precision=PRECISION[dtype],
                   default_root_dir=str(directory / "runs"))
    trainer["logger"]["init_args"].update(
        experiment_name="xm2-perf", run_name=f"perf-fit-{size}-{dtype}-{compile_mode}",
        tracking_uri=f"sqlite:///{ROOT / 'artifacts' / 'benchmarks' / 'mlflow.db'}")
    callbacks = []
    for entry in trainer["callbacks"]:
        name = entry["class_path"].rsplit(".", 1)[-1]
        if name in ("Calibration", "ContextLaw") and not recipe_row:
            continue
        if name == "ModelCheckpoint":
            entry = copy.deepcopy(entry)
            # One save inside the measured steps (timed on its own), as the recipe saves every 60.
            entry["init_args"]["every_n_train_steps"] = warmup + steps // 2 if recipe_row else 10**6
        callbacks.append(entry)
    callbacks.append({"class_path": "perf_probe.FitProbe",
                      "init_args": {"output": str(directory / "probe.json")}})
    trainer["callbacks"] = callbacks
    if recipe_row:
        trainer["val_check_interval"] = warmup + steps // 2
    else:
        trainer["limit_val_batches"] = 0
    schedule = config["model"]["schedule"]
    # Warmup, stable and decay (and the switch to the decay mixture) inside the run.
    schedule.update(warmup_steps=min(2, warmup), decay_start_step=warmup + steps // 2)
    config["model"]["parallel"] = {"compile": False if compile_mode == "none" else compile_mode}
    config["data"]["batch_size"] = BATCH[size]
    path = directory / "fit.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def environment(code: Path | None, *paths: Path) -> dict:
    """os.environ with ``paths`` first on PYTHONPATH, and ``code`` (a checkout of another
    revision) before them: its ``xm2`` and ``callbacks`` packages shadow the installed ones."""
    entries = [str(p) for p in ((code,) if code else ()) + paths]
    if os.environ.get("PYTHONPATH"):
        entries.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(entries)}


def measure_fit(size: str, dtype: str, compile_mode: str, warmup: int, steps: int,
                code: Path | None = None) -> dict:
    recipe_row = (size, dtype, compile_mode) == RECIPE
    with tempfile.TemporaryDirectory(prefix="xm2-perf-") as folder:
        directory = Path(folder)
        config = fit_config(size, dtype, compile_mode, warmup, steps, directory, recipe_row)
        env = environment(code, ROOT / "benchmarks")
        # Another revision: `python -P -m xm2.cli` (what the console script runs; -P keeps the
        # working directory off sys.path, so the revision's code on PYTHONPATH is imported).
        program = [PYTHON, "-P", "-m", "xm2.cli"] if code else [XM2]
        run = run_process([*program, "fit", "--config", str(config)], env)
        probe_path = directory / "probe.json"
        if run["code"] != 0 or not probe_path.is_file():
            raise RuntimeError(f"xm2 fit failed ({run['code']}): {run['stderr'][-3000:]}")
        probe = json.loads(probe_path.read_text())
    intervals = probe["intervals"][warmup:]
    tokens_per_step = BATCH[size] * architecture(size).max_seq_len
    result = {
        "tokens_per_s": tokens_per_step * len(intervals) / sum(intervals),
        "median_step_s": statistics.median(intervals),
        "startup_s": probe["first_step_wall"] - run["launched"],
        "first_step_s": probe["intervals"][0],
        "peak_rss_mb": run["peak_rss_mb"],
        "steps": len(intervals),
        "callbacks": probe["callbacks"],
        "validation_s": probe["validation_s"],
        "probe_steps": probe["steps"],
        "recipe_row": recipe_row,
    }
    return result


def measure_loop(impl: str, size: str, dtype: str, compile_mode: str, warmup: int,
                 steps: int, code: Path | None = None) -> dict:
    command = [PYTHON, str(ROOT / "benchmarks" / "perf_loop.py"), "--impl", impl, "--size", size,
               "--dtype", dtype, "--compile", compile_mode, "--warmup", str(warmup),
               "--steps", str(steps)]
    run = run_process(command, environment(code))
    lines = [line for line in run["stdout"].splitlines() if line.startswith("{")]
    if run["code"] != 0 or not lines:
        raise RuntimeError(f"perf_loop {impl} failed ({run['code']}): {run['stderr'][-3000:]}")
    # Start-up from the launch of the process, as for xm2 fit.
    return {**json.loads(lines[-1]), "peak_rss_mb": run["peak_rss_mb"]}


def architecture(size: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from perf_loop import architecture as preset

    return preset(size)


def measure_peaks() -> dict[str, float]:
    """Matmul FLOP/s in fp32 and bf16 (2048², median of 5), in a fresh process."""
    code = ("import json, torch; from xm2.analysis.flops import measure_peak_flops; "
            "print(json.dumps({'fp32': measure_peak_flops(torch.float32, 2048, 5), "
            "'bf16': measure_peak_flops(torch.bfloat16, 2048, 5)}))")
    run = run_process([PYTHON, "-c", code])
    if run["code"] != 0:
        raise RuntimeError(run["stderr"][-2000:])
    return json.loads(run["stdout"].strip().splitlines()[-1])


def checkout(revision: str) -> Path:
    """The ``xm2`` and ``callbacks`` packages of a git revision, extracted once into a
    temporary folder (the repository and its work tree are left as they are)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", revision],
                            check=True, capture_output=True, text=True).stdout.strip()
    folder = Path(tempfile.gettempdir()) / f"xm2-perf-baseline-{commit}"
    if not (folder / "xm2" / "model.py").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "xm2", "callbacks"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def median_of(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(rows: dict, peaks: list[dict]) -> list[dict]:
    from xm2.analysis.flops import flops_per_token

    # A peak is the best the machine did: the highest of the rounds' measurements (a busy
    # moment only ever lowers one).
    peak = {dtype: max(p[dtype] for p in peaks) for dtype in ("fp32", "bf16")}
    table = []
    for (impl, size, dtype, compile_mode), results in rows.items():
        config = architecture(size)
        tokens = median_of([r["tokens_per_s"] for r in results])
        flops = flops_per_token(config, config.max_seq_len)
        table.append({
            "impl": impl, "size": size, "dtype": dtype, "compile": compile_mode,
            "tokens_per_s": tokens, "tokens_per_s_rounds": [r["tokens_per_s"] for r in results],
            "mfu": tokens * flops / peak[dtype] if tokens else None,
            "gflops": tokens * flops / 1e9 if tokens else None,
            "peak_rss_mb": median_of([r.get("peak_rss_mb") for r in results]),
            "startup_s": median_of([r.get("startup_s") for r in results]),
            "first_step_s": median_of([r.get("first_step_s") for r in results]),
            "batch": f"{BATCH[size]}x{config.max_seq_len}",
        })
    return table


PER_STEP_HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_before_backward",
                  "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad",
                  "log_metrics")


def overheads(recipe_results: list[dict], consumed_tokens_per_s: float) -> dict:
    """Validation, analyses, checkpoint saves and per-step callback work of the recipe row,
    projected onto config/nano.yaml: 300 steps, 10 validations, 5 checkpoints, each analysis
    twice; the share is of the 300 training steps at the measured ``xm2 fit`` rate."""
    tokens_per_step = BATCH["nano"] * architecture("nano").max_seq_len
    training_s = RECIPE_STEPS * tokens_per_step / consumed_tokens_per_s
    out = {"recipe_training_s": training_s, "items": {}}

    def add(name, values, times, kind):
        each = median_of(values)
        if each is not None:
            out["items"][name] = {"seconds_each": each, "times": times, "kind": kind,
                                  "share": each * times / training_s}

    add("validation", [statistics.median(r["validation_s"]) for r in recipe_results
                       if r["validation_s"]], RECIPE_VALIDATIONS, "separate")
    add("checkpoint save", [r["callbacks"]["checkpoint_save"]["seconds"]
                            / r["callbacks"]["checkpoint_save"]["calls"]
                            for r in recipe_results if "checkpoint_save" in r["callbacks"]],
        RECIPE_CHECKPOINTS, "separate")
    for analysis in ("Calibration", "ContextLaw"):
        # Both runs (decay start, end) are in the measured fit.
        add(analysis, [sum(v["seconds"] for k, v in r["callbacks"].items()
                           if k.startswith(analysis + ".")) / RECIPE_ANALYSES
                       for r in recipe_results], RECIPE_ANALYSES, "separate")
    names = {key.split(".")[0] for r in recipe_results for key in r["callbacks"]}
    for name in sorted(names - {"Calibration", "ContextLaw", "checkpoint_save"}):
        per_step = []
        for r in recipe_results:
            seconds = sum(v["seconds"] for k, v in r["callbacks"].items()
                          if k.split(".")[0] == name and k.split(".")[-1] in PER_STEP_HOOKS)
            if name == "ModelCheckpoint":  # its writes are a line of their own
                seconds = max(0.0, seconds - r["callbacks"].get("checkpoint_save",
                                                                {"seconds": 0})["seconds"])
            per_step.append(seconds / r["probe_steps"])
        once = [sum(v["seconds"] for k, v in r["callbacks"].items()
                    if k.split(".")[0] == name and k.split(".")[-1] not in PER_STEP_HOOKS)
                for r in recipe_results]
        add(f"{name} (per step, inside tokens/s)", per_step, RECIPE_STEPS, "per step")
        if median_of(once):
            add(f"{name} (setup and end)", once, 1, "once")
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| size | dtype | compile | impl | tokens/s | MFU | GFLOP/s | peak RSS MB "
             "| start-up s | first step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(table, key=lambda r: (r["size"], r["dtype"], r["compile"], r["impl"])):
        lines.append(
            f"| {row['size']} | {row['dtype']} | {row['compile']} | {row['impl']} | "
            f"{row['tokens_per_s']:,.0f} | {row['mfu']:.0%} | {row['gflops']:.0f} | "
            f"{row['peak_rss_mb']:,.0f} | {row['startup_s']:.1f} | {row['first_step_s']:.1f} |")
    return "\n".join(lines)


def ratios(table: list[dict], baseline: str | None = None) -> list[dict]:
    """fit/raw and xm2 (raw)/transformers per (size, dtype, compile); with a baseline revision,
    also this code's fit and raw loop against that revision's."""
    index = {(r["impl"], r["size"], r["dtype"], r["compile"]): r["tokens_per_s"] for r in table}
    out = []
    for (impl, size, dtype, compile_mode), tokens in sorted(index.items()):
        if impl != "raw":
            continue

        def get(name, compile_mode=compile_mode, size=size, dtype=dtype):
            return index.get((name, size, dtype, compile_mode))

        fit, hf, hf_eager = get("fit"), get("hf"), get("hf", "none")
        row = {"size": size, "dtype": dtype, "compile": compile_mode,
               "fit_over_raw": fit / tokens if fit else None,
               "xm2_over_hf": tokens / hf if hf else None,
               "xm2_over_hf_eager": tokens / hf_eager if hf_eager else None}
        if baseline:
            base_fit, base_raw = get(f"fit@{baseline}", "none"), get(f"raw@{baseline}", "none")
            row["fit_over_baseline_fit_eager"] = fit / base_fit if fit and base_fit else None
            row["raw_over_baseline_raw_eager"] = tokens / base_raw if base_raw else None
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="nano, eager, half the steps, one round (a smoke run of the suite)")
    parser.add_argument("--sizes", nargs="+", default=["nano", "tiny"], choices=list(BATCH))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(PRECISION))
    parser.add_argument("--compile", nargs="+", default=["none", "model"],
                        choices=["none", "model", "blocks"])
    parser.add_argument("--impls", nargs="+", default=["fit", "raw", "hf"],
                        choices=["fit", "raw", "hf"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, nargs=2, metavar=("WARMUP", "TIMED"), default=None,
                        help="warm-up and timed steps of every size (default: nano 3 8, tiny 2 4)")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also run the eager fit and raw rows with the xm2 code of this git "
                             "revision (e.g. the commit before the performance work), "
                             "interleaved with the others: before/after on the same machine")
    parser.add_argument("--skip_data", action="store_true",
                        help="skip the data pipeline, tokenizer and shard measurements")
    parser.add_argument("--output", default=str(ROOT / "artifacts" / "benchmarks" / "perf.json"))
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.compile, args.rounds = ["nano"], ["none"], 1
    steps = {size: tuple(args.steps) if args.steps else
             (max(1, w // 2), max(2, s // 2)) if args.quick else (w, s)
             for size, (w, s) in STEPS.items()}
    (ROOT / "artifacts" / "benchmarks").mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.time()

    baseline = checkout(args.baseline) if args.baseline else None
    rows: dict[tuple, list[dict]] = {}
    peaks = []
    for round_index in range(args.rounds):
        peaks.append(measure_peaks())
        print(f"round {round_index + 1}/{args.rounds}: peak fp32 {peaks[-1]['fp32'] / 1e9:.0f}, "
              f"bf16 {peaks[-1]['bf16'] / 1e9:.0f} GFLOP/s", flush=True)
        for size in args.sizes:
            for compile_mode in args.compile:
                warmup, timed = steps[size]
                # Compiled: the first two steps compile the forward and the backward graphs.
                warmup += 2 if compile_mode != "none" else 0
                for dtype in args.dtypes:
                    runs = [(impl, None) for impl in args.impls]
                    if baseline and compile_mode == "none":
                        runs += [(f"{impl}@{args.baseline}", baseline) for impl in args.impls
                                 if impl in ("fit", "raw")]
                    for impl, code in runs:
                        key = (impl, size, dtype, compile_mode)
                        kind = impl.split("@")[0]
                        try:
                            result = (measure_fit(size, dtype, compile_mode, warmup, timed, code)
                                      if kind == "fit" else
                                      measure_loop(kind, size, dtype, compile_mode, warmup, timed,
                                                   code))
                        except RuntimeError as error:
                            print(f"  {key}: FAILED {error}", flush=True)
                            continue
                        rows.setdefault(key, []).append(result)
                        print(f"  {impl:3} {size} {dtype} compile={compile_mode}: "
                              f"{result['tokens_per_s']:,.0f} tok/s, start-up "
                              f"{result['startup_s']:.1f} s", flush=True)

    table = summarise(rows, peaks)
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
        "seconds": time.time() - started,
        "command": " ".join(sys.argv),
        "peak_flops": peaks,
        "rows": table,
        "ratios": ratios(table, args.baseline),
        "baseline": args.baseline,
    }
    try:
        import torch

        report["machine"]["torch"] = torch.__version__
        report["machine"]["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        report["machine"]["threads"] = torch.get_num_threads()
    except ImportError:
        pass
    recipe = rows.get(("fit", *RECIPE))
    if recipe:
        report["overheads"] = overheads(recipe, median_of([r["tokens_per_s"] for r in recipe]))
    if not args.skip_data:
        consumption = {size: max((r["tokens_per_s"] for r in table if r["size"] == size), default=None)
                       for size in args.sizes}
        run = run_process([PYTHON, str(ROOT / "benchmarks" / "perf_data.py"), "--sizes",
                           *args.sizes] + (["--quick"] if args.quick else []))
        if run["code"] == 0:
            data = json.loads(run["stdout"].strip().splitlines()[-1])
            for size, pipeline in data["pipeline"].items():
                if consumption.get(size):
                    pipeline["fastest_training_tokens_per_s"] = consumption[size]
                    pipeline["times_consumption"] = pipeline["tokens_per_s"] / consumption[size]
            report["data"] = data
        else:
            print(f"perf_data failed: {run['stderr'][-2000:]}")

    Path(args.output).write_text(json.dumps(report, indent=1))
    print()
    print(markdown(table))
    print()
    for ratio in report["ratios"]:
        def fmt(value):
            return "-" if value is None else f"{value:.3f}"
        print(f"{ratio['size']} {ratio['dtype']} compile={ratio['compile']}: fit/raw "
              f"{fmt(ratio['fit_over_raw'])}, xm2/transformers {fmt(ratio['xm2_over_hf'])}"
              f" (against transformers eager {fmt(ratio['xm2_over_hf_eager'])})"
              + (f"; against {args.baseline} eager: fit "
                 f"{fmt(ratio['fit_over_baseline_fit_eager'])}, raw "
                 f"{fmt(ratio['raw_over_baseline_raw_eager'])}" if args.baseline else ""))
    if "overheads" in report:
        print(f"\nrecipe overheads (projected onto config/nano.yaml, training "
              f"{report['overheads']['recipe_training_s']:.0f} s):")
        for name, item in report["overheads"]["items"].items():
            if item["seconds_each"] >= 0.0005:
                print(f"  {name}: {item['seconds_each']:.3f} s × {item['times']} = "
                      f"{item['share']:.2%}")
    if "data" in report:
        print("\ndata:", json.dumps(report["data"], indent=1))
    print(f"\nwrote {args.output} ({report['seconds']:.0f} s; load average before "
          f"{load_before[0]:.2f}, after {report['machine']['load_average_after'][0]:.2f})")


if __name__ == "__main__":
    main()
