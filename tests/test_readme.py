"""Every ``xm2`` command line the README shows is accepted by the CLI as written.

Each line is parsed and validated by the real ``xm2`` parser with ``--print_config`` appended
(which checks every option and value, then stops before any work); placeholders such as
``<checkpoint>`` get a sample value. In-process: one Lightning import for all of them.
"""

import re
import shlex

from tests.conftest import ROOT
from xm2.cli import PASS_THROUGH, main

PLACEHOLDERS = {"<run id>": "0123456789abcdef", "<uri>": "sqlite:///mlflow.db"}


def readme_command_lines() -> list[str]:
    """The xm2 command lines in the README's bash blocks, without comments or redirections."""
    lines, in_bash = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        command = line.split("  #")[0].split(" # ")[0].strip()
        if in_bash and re.match(r"^(\.venv/bin/)?xm2 ", command):
            lines.append(command)
    return lines


def test_the_readme_shows_each_command():
    shown = {line.split()[1] for line in readme_command_lines()}
    assert {"fit", "validate", "tokenize", "train-tokenizer", "coord-check", "sweep"} <= shown


def test_every_readme_command_line_is_accepted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    run_yaml = tmp_path / "run.yaml"
    lines = readme_command_lines()
    assert len(lines) >= 10
    for line in lines:
        redirect = None
        if " > " in line:
            line, redirect = (part.strip() for part in line.split(" > "))
        for placeholder, value in PLACEHOLDERS.items():
            line = line.replace(placeholder, value)
        line = re.sub(r"<([^<>]*)>", lambda match: match.group(1).replace(" ", "_") or "x", line)
        words = shlex.split(line)[1:]
        if words[0] in PASS_THROUGH:
            continue  # lm-eval's own parser: tests/test_lm_eval.py runs it
        words = [str(run_yaml) if word == "run.yaml" else word for word in words]
        if "--print_config" not in words and "--help" not in words:
            words.append("--print_config")
        try:
            main(words)  # --print_config and --help print and exit; `xm2 --help` returns
            code = 0
        except SystemExit as stopped:
            code = stopped.code
        printed = capsys.readouterr()
        assert code in (0, None), f"{line}\n{printed.err[-2000:]}"
        assert printed.out, line
        if redirect == "run.yaml":
            run_yaml.write_text(printed.out)
