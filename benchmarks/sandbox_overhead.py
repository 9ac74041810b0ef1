"""What the code sandbox costs per program, layer by layer, and which layers this machine has.

    .venv/bin/python benchmarks/sandbox_overhead.py [--programs 164] [--workers 1 2]

Runs ``--programs`` programs through ``xm2.eval.sandbox.execute_many`` in each configuration and
prints the wall time per program: a bare ``python -I -S -B -c`` subprocess (the floor), the
sandbox without its namespaces, without its guard, and whole. The programs are HumanEval's
canonical solutions with their tests when ``data/eval/humaneval.jsonl.gz`` is there (all must
pass), else trivial ones. The first line lists the layers a run gets on this machine.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from xm2.eval.code import humaneval_program, pass_at_1
from xm2.eval.sandbox import execute, execute_many

HUMANEVAL = Path(__file__).resolve().parents[1] / "data" / "eval" / "humaneval.jsonl.gz"

CONFIGURATIONS = {
    "sandbox, guard only (network_namespace=off)": {"network_namespace": "off"},
    "sandbox, namespaces only (guard=False)": {"guard": False},
    "sandbox, all layers (default)": {},
}


def programs(count: int) -> tuple[str, list[str]]:
    if not HUMANEVAL.exists():
        return "trivial", [f"assert sum(range({i})) == {i * (i - 1) // 2}" for i in range(count)]
    with gzip.open(HUMANEVAL, "rt", encoding="utf-8") as file:
        problems = [json.loads(line) for line in file]
    chosen = [problems[i % len(problems)] for i in range(count)]
    texts = [
        humaneval_program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"])
        for p in chosen
    ]
    return "HumanEval canonical solutions", texts


def bare(texts: list[str], workers: int) -> None:
    def run(text: str) -> None:
        subprocess.run(
            [sys.executable, "-I", "-S", "-B", "-c", text], capture_output=True, check=True
        )

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run, texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--programs", type=int, default=164)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    print("layers on this machine:", ", ".join(execute("pass").layers))
    kind, texts = programs(args.programs)
    print(f"{len(texts)} programs ({kind})")
    for workers in args.workers:
        start = time.perf_counter()
        bare(texts, workers)
        floor = (time.perf_counter() - start) / len(texts)
        print(f"workers={workers}  bare python -I -S -B -c: {floor * 1000:6.1f} ms/program")
        for name, options in CONFIGURATIONS.items():
            start = time.perf_counter()
            results = execute_many(texts, workers=workers, timeout_s=20.0, **options)
            per_program = (time.perf_counter() - start) / len(texts)
            print(
                f"workers={workers}  {name}: {per_program * 1000:6.1f} ms/program "
                f"(+{(per_program - floor) * 1000:.1f} ms over bare), pass@1 {pass_at_1(results):.3f}"
            )


if __name__ == "__main__":
    main()
