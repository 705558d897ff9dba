"""Stopping the server processes that local mode and the test fixtures start."""

from __future__ import annotations

import logging
import signal
import subprocess

logger = logging.getLogger("eventrails.process")


def stop_process(
    process: subprocess.Popen[bytes] | None, name: str, timeout: float, signum: int = signal.SIGTERM,
) -> None:
    """Send ``signum`` and wait; kill the process when it has not exited after ``timeout`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signum)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("%s pid=%s did not stop within %.0fs; killing it", name, process.pid, timeout)
        process.kill()
        process.wait()


def kill_process(process: subprocess.Popen[bytes] | None) -> None:
    """Kill the process at once, as a crash would, and reap it."""
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()
