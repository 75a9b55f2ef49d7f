"""What a result was measured on: host, processor, GPU, versions, commit, date, command line."""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
GIT_TIMEOUT_S = 5
# Metadata keys copied into every CSV row, so that rows from different runs can be concatenated.
ROW_TAGS = ("hostname", "device_name", "torch", "triton", "python", "git_commit", "date_utc", "command")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: recorded as absent
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def collect(device: str, command: str, extra: dict | None = None) -> dict:
    """Metadata of a run on ``device`` started by ``command``; ``extra`` entries are added as given."""
    cuda = device == "cuda"
    status = _git("status", "--porcelain", "--untracked-files=no")
    meta = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else cpu_name(),
        "cuda_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "effattn": _version("effattn"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }
    meta.update(extra or {})
    return meta
