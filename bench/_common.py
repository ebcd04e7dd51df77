"""Helpers shared by the benchmark scripts (run as `python bench/NAME.py`, so this is imported by name)."""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

MiB = 1024 * 1024


def log(msg: str) -> None:
    """Progress to stderr (stdout carries only JSON)."""
    print(msg, file=sys.stderr, flush=True)


def emit(record: dict[str, Any]) -> None:
    """One figure: one JSON line on stdout."""
    print(json.dumps(record), flush=True)


def mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def parse_size(text: str) -> int:
    """'64MiB', '64M', '1GiB', '4096' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    value = int(m.group(1)) * {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB}[m.group(2).upper()]
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
