"""``xm2 tracking-sync`` of a damaged backlog: one line naming the file and the line, nothing sent.

(The other refusals of damaged or unsafe inputs are tested beside their code: checkpoints and
``xm2 verify`` in test_checkpoint.py, exports in test_interop_hf.py, lm-eval tasks in
test_lm_eval.py, the wind tunnel's journal in test_windtunnel.py.)
"""

import json

import pytest

from tests.test_errors import console, one_line_error

SENT_FIRST = {"op": "log_batch", "run_id": "0123", "metrics": [["train/loss", 4.2, 1, 3]],
              "params": [], "tags": []}


@pytest.mark.parametrize(("damaged_line", "problem"), [
    # A run killed while it appended a record leaves the line cut short.
    ('{"op": "log_batch", "run_id": "0123", "metr',
     "is not JSON (Unterminated string starting at, column 39)"),
    ('{"run_id": "0123", "status": "FINISHED"}', "is a record without 'op'"),
])
def test_a_damaged_backlog_is_one_line_naming_the_line_and_nothing_is_sent(tmp_path,
                                                                           damaged_line, problem):
    backlog = tmp_path / "mlflow-backlog-0123.jsonl"
    backlog.write_text(json.dumps(SENT_FIRST) + "\n" + damaged_line + "\n")
    before = backlog.read_bytes()
    store = tmp_path / "mlflow.db"
    result = console("tracking-sync", str(backlog), "--tracking_uri", f"sqlite:///{store}",
                     cwd=tmp_path)
    assert one_line_error(result) == (
        f"xm2: error: backlog file {backlog} line 2 {problem}; nothing was sent. Delete or repair "
        "that line (a run killed while writing leaves its last line cut short) and run "
        "`xm2 tracking-sync` again")
    assert backlog.read_bytes() == before and not store.exists()
