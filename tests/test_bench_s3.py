"""bench/s3.py runs a real cluster, its gateway and moto's server, and prints well-formed JSON figures.

A smoke run, not a timing test: the figures' values depend on the machine.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench" / "s3.py"


def test_s3_bench_quick_prints_json_figures():
    pytest.importorskip("moto.server")
    p = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    head = lines[0]
    assert head["bench"] == "s3" and head["size_bytes"] == 32 << 20 and head["small_count"] == 50
    assert head["repeat"] == 1 and head["event_loop"]
    figures = {d["figure"]: d for d in lines[1:]}
    assert set(figures) == {"large_put", "large_get", "small_put", "small_get"}
    for op in ("put", "get"):
        large, small = figures[f"large_{op}"], figures[f"small_{op}"]
        assert large["gateway_mbps"] > 0 and large["library_mbps"] > 0 and large["ratio"] > 0
        assert len(large["rounds_gateway_mbps"]) == len(large["rounds_library_mbps"]) == 1
        assert small["gateway_ops"] > 0 and small["moto_ops"] > 0 and small["library_ops"] > 0
        assert small["ratio"] == pytest.approx(small["gateway_ops"] / small["moto_ops"], rel=0.01)
