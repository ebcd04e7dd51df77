"""The field benchmark runs and prints well-formed JSON figures (smoke run, not a timing test)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
BENCH = ROOT / "bench" / "field.py"
KERNELS = {"add", "sub", "mul", "neg", "scale", "add_const", "dot", "total", "lincomb", "lincomb_small",
           "sqrt", "power", "inverse", "from_ints", "to_ints", "to_signed"}


def positive(value: object) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def test_field_bench_quick_prints_json_figures():
    path = [str(ROOT), os.environ.get("PYTHONPATH", "")]  # qstore importable without an install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    p = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert lines[0]["figure"] == "environment" and lines[0]["backend"] in ("llvm", "reference")
    figures = {d["figure"]: d for d in lines[1:]}
    assert KERNELS | {"random", "check"} <= set(figures)
    for name, d in figures.items():
        assert d["elements"] == 2000 and positive(d["seconds"]) and positive(d["per_element_ns"]), d
        if name in KERNELS:
            assert 0 < d["reference_elements"] <= 2000 and positive(d["reference_seconds"]), d
            assert positive(d["reference_per_element_ns"]) and positive(d["speedup"]), d
    for name in ("add", "mul", "dot", "lincomb", "sqrt"):
        assert positive(figures[name]["target_per_element_ns"])
        assert isinstance(figures[name]["meets_target"], bool)
    assert figures["lincomb"]["vectors"] == 5
