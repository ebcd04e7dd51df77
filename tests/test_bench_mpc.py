"""bench/mpc.py --quick: a real 3-node cluster answers each benchmark query exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_runs_and_every_answer_is_exact():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "mpc.py"), "--quick", "--no-mpyc",
                          "--ops", "sum,var,filtered_mean,lt_count,median,linreg"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    ours = [d for d in docs if d.get("impl") == "qstore"]
    assert {d["op"] for d in ours} == {"sum", "var", "filtered_mean", "lt_count", "median", "linreg"}
    for d in ours:
        assert d["rows"] == 300 and d["seconds"] > 0 and d["key_spent_bytes"] > 0
        assert d["rel_error"] < 1e-12, d  # exact up to float printing
