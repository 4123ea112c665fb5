"""Start `python app.py ...` as a real server on 127.0.0.1 for end-to-end tests, and always stop it.

`running_app(args, env, log_path)` is a context manager yielding an `AppProcess` (`.url`, `.log()`); the server
gets a free port, listens on loopback only, runs with no network (HF_HUB_OFFLINE, an empty HF_HOME, no
analytics), keeps its conversations in `tmp_dir/data` unless `env` names an RWKV_DATA_DIR, and is terminated
(SIGTERM, then killed) on exit. `chat_stats(text)` parses the stats line.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 180
PREFILL = re.compile(r"prefill (\d+) tok")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AppProcess:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _wait_until_serving(app: AppProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if app.process.poll() is not None:
            raise RuntimeError(f"app exited with {app.process.returncode}:\n{app.log()}")
        try:
            with urllib.request.urlopen(app.url + "config", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"app did not start within {START_TIMEOUT_S} s:\n{app.log()}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def running_app(args: list[str], tmp_dir: Path, env: dict | None = None, port: int | None = None):
    port = port or free_port()
    hf_home = tmp_dir / "hf_home"
    hf_home.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "GRADIO_ANALYTICS_ENABLED": "False",
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RWKV_DATA_DIR": str(tmp_dir / "data"),
                **(env or {})}
    for name in ("RWKV_MODEL", "RWKV_DEVICE", "RWKV_DTYPE", "RWKV_PREAMBLE", "RWKV_STATES", "RWKV_API_KEY",
                 "RWKV_CORS_ORIGINS", "GRADIO_SHARE", "SPACE_ID", "RWKV_KEEP_DAYS", "RWKV_DRAIN_SECONDS",
                 "RWKV_MODELS", "RWKV_LOAD_COOLDOWN", "RWKV_STATS_EVERY", "RWKV_ENGINE_PROCESSES"):
        if env is None or name not in env:
            full_env.pop(name, None)
    log_path = tmp_dir / f"app-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "app.py", *args, "--server-name", "127.0.0.1",
                                    "--port", str(port)], cwd=REPO, env=full_env, stdout=log,
                                   stderr=subprocess.STDOUT)
    app = AppProcess(process, f"http://127.0.0.1:{port}/", log_path)
    try:
        _wait_until_serving(app)
        yield app
    finally:
        _stop(process)


def chat_stats(stats: str) -> int:
    """The N of `prefill N tok` in a stats line."""
    match = PREFILL.search(stats)
    assert match, f"no 'prefill N tok' in {stats!r}"
    return int(match.group(1))
