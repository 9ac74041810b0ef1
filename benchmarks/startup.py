"""How long ``xm2`` takes before it does anything: help, the data tools, and the Lightning commands.

    .venv/bin/python benchmarks/startup.py [--repeats 5]

Runs each command line through the console script (``.venv/bin/xm2``) ``--repeats`` times and
prints the median and the fastest wall time. ``xm2 --help`` and a tool's ``--help`` import
neither torch nor Lightning; ``xm2 fit --help`` does (LightningCLI builds its parser from the
Trainer's signature), so it is the reference for what the lazy imports save.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

XM2 = str(Path(sys.executable).parent / "xm2")
COMMANDS = {
    "xm2 --help": [XM2, "--help"],
    "xm2 tokenize --help": [XM2, "tokenize", "--help"],
    "xm2 train-tokenizer --help": [XM2, "train-tokenizer", "--help"],
    "xm2 branches --help": [XM2, "branches", "--help"],
    "xm2 fit --help": [XM2, "fit", "--help"],
    "python -c 'import xm2.lightning_cli'": [sys.executable, "-c", "import xm2.lightning_cli"],
}


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print("| command | median s | fastest s |")
    print("|---|---|---|")
    for name, command in COMMANDS.items():
        timed(command)  # warm the file cache: the first start after an install reads from disk
        times = [timed(command) for _ in range(args.repeats)]
        print(f"| `{name}` | {statistics.median(times):.2f} | {min(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
