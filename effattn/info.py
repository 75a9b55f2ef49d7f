"""``python -m effattn.info``: versions, devices and which backends can run here (and why not)."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

import effattn
from effattn.backends import AUTO_ORDER, BACKENDS, ENV_BACKEND, AttentionCall


def _probe_calls() -> list[tuple[str, AttentionCall]]:
    calls = [("cpu float32 D=64", AttentionCall(torch.device("cpu"), torch.float32, 64, 64, 1024, 1024, False))]
    if torch.cuda.is_available():
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            calls.append((f"cuda {str(dt).removeprefix('torch.')} D=128",
                          AttentionCall(torch.device("cuda"), dt, 128, 128, 4096, 4096, False)))
    return calls


def report() -> str:
    lines = [f"effattn {effattn.__version__}", f"python {sys.version.split()[0]} ({platform.machine()})",
             f"torch {torch.__version__}"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except Exception as e:  # pragma: no cover - depends on the machine
        lines.append(f"triton: not importable ({e})")
    if torch.cuda.is_available():
        lines.append(f"cuda: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        lines.append("cuda: no device")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} "
                 f"{ENV_BACKEND}={os.environ.get(ENV_BACKEND, '')!r}")
    lines.append(f"automatic order: {', '.join(AUTO_ORDER)}")
    lines.append("backends:")
    for name, b in BACKENDS.items():
        un = b.unavailable_reasons()
        lines.append(f"  {name:<10} {b.description}: " + ("available" if not un else "unavailable: " + "; ".join(un)))
        for label, call in _probe_calls():
            why = b.not_supported_reasons(call)
            lines.append(f"    {label:<22} " + ("runs" if not why else "no: " + "; ".join(why)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effattn.info (effattn-info)",
                                     description="Print effattn's and torch's versions, the devices, and which "
                                                 "attention backends can run here (and why not).")
    parser.parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
