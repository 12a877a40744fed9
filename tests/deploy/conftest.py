"""Helpers for the deployment tests: a small experiment, enrolment, server and client processes."""
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import atoll
from atoll import config

SRC = str(Path(atoll.__file__).resolve().parents[1])

SMALL = """
name = "dep"
rounds = {rounds}
[data]
name = "digits"
num_clients = {clients}
[model]
hidden = [16]
[client]
batch_size = 32
[sampling]
clients_per_round = {per_round}
[deploy]
round_timeout = {timeout}
chunk_kb = 1  # the ~5 KB broadcasts and updates travel in several chunks
"""


def small_config(tmp: Path, rounds=3, clients=4, per_round=None, timeout=30.0):
    text = SMALL.format(rounds=rounds, clients=clients, per_round=per_round or clients, timeout=timeout)
    (tmp / "exp.toml").write_text(text)
    return config.load(tmp / "exp.toml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def atoll_process(*args, log: Path) -> subprocess.Popen:
    """``python -m atoll.cli ARGS`` in a new process, output to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "atoll.cli", *map(str, args)], env=env(),
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def listening_port(log: Path, timeout=30.0) -> int:
    def port():
        m = re.search(r"listening on port (\d+)", log.read_text() if log.exists() else "")
        return int(m.group(1)) if m else None
    return wait_for(port, timeout, f"the server to listen ({log})")


class ServerThread:
    """An in-process ``Server`` running its rounds in a thread."""

    def __init__(self, server):
        self.server, self.final = server, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.final = self.server.run()

    def join(self, timeout=60.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "server did not finish"


@pytest.fixture
def kill_on_exit():
    procs = []
    yield procs.append
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
