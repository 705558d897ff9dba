"""The CLI's log formats: text by default, one JSON object per line on request."""

import json
import os
import subprocess
import sys


def _worker_output(**env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "eventrails", "worker", "no_such_module:worker"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )
    assert result.returncode == 2, result.stderr
    return result.stderr


def test_text_log_line_by_default() -> None:
    line = _worker_output().strip().splitlines()[-1]
    assert " ERROR   eventrails.worker: worker cannot start: " in line


def test_json_log_lines_from_env() -> None:
    record = json.loads(_worker_output(EVENTRAILS_LOG_FORMAT="json").strip().splitlines()[-1])
    assert record["level"] == "ERROR"
    assert record["logger"] == "eventrails.worker"
    assert "no_such_module" in record["message"]
    assert record["time"]


def test_unknown_log_format_is_rejected() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "eventrails", "--log-format", "xml", "crds"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "'xml' is invalid: use 'text' or 'json'" in result.stderr
