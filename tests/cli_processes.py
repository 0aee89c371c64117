"""Running the real `dvl-batch` command as a subprocess that tests can watch, signal and
inject faults into (tests/support/sitecustomize.py, enabled through DVL_TEST_FAULTS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .conftest import cli_env

SUPPORT = Path(__file__).parent / "support"


def fault_env(cache_dir: Path, faults: dict | None = None) -> dict[str, str]:
    """cli_env plus the fault-injection folder on PYTHONPATH; one torch thread per run."""
    env = cli_env(cache_dir)
    env["PYTHONPATH"] = str(SUPPORT) + os.pathsep + env["PYTHONPATH"]
    env["OMP_NUM_THREADS"] = "1"
    if faults:
        env["DVL_TEST_FAULTS"] = json.dumps(faults)
    return env


class Run:
    """A CLI subprocess whose stderr is collected by a thread (and watched for a line)."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dvl_batch", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.seen = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self.seen:
                self.lines.append(line)
                self.seen.notify_all()
        with self.seen:
            self.seen.notify_all()

    def wait_for_line(self, text: str, timeout: float = 120) -> bool:
        deadline = time.monotonic() + timeout
        with self.seen:
            while not any(text in line for line in self.lines):
                if self.proc.poll() is not None and not self.reader.is_alive():
                    return False
                waited = self.seen.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
                if not waited and time.monotonic() > deadline:
                    return False
            return True

    def wait(self, timeout: float = 180) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        self.proc.stdout.close()
        return code

    def lines_with(self, text: str) -> list[str]:
        with self.seen:
            return [line for line in self.lines if text in line]

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


class Overlapped:
    """Commands that share nothing (each has its own OUT, data and reports; the tiny-model cache is
    only read), run two at a time in the background instead of one after another; each test takes
    the `subprocess.run` result of its own (timeouts count from each command's start, as before)."""

    def __init__(self, commands: dict[str, tuple[list[str], dict[str, str], float]], at_once: int = 2):
        self.pool = ThreadPoolExecutor(max_workers=at_once)
        self.seconds: dict[str, float] = {}  # how long each command ran, from its own start
        self.futures = {name: self.pool.submit(self._run, name, *command) for name, command in commands.items()}

    def _run(self, name: str, args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        started = time.monotonic()
        try:
            return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
        finally:
            self.seconds[name] = time.monotonic() - started

    def result(self, name: str) -> subprocess.CompletedProcess:
        return self.futures[name].result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def holds_lock(out: Path, pid: int) -> bool:
    try:
        return f"pid {pid} " in (out / ".lock").read_text()
    except OSError:
        return False


def wait_until(condition, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return condition()
        time.sleep(0.02)
    return False
