"""bench/storage.py runs a real cluster and prints well-formed JSON figures (smoke run, not a timing test)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench" / "storage.py"


def test_storage_bench_quick_prints_json_figures():
    p = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert lines[0]["bench"] == "storage" and lines[0]["size_bytes"] == 16 << 20
    figures = {d["figure"]: d for d in lines[1:]}
    assert set(figures) == {"put", "get"}
    put, get = figures["put"], figures["get"]
    assert put["mbps"] > 0 and get["mbps"] > 0 and put["client_peak_rss_mib"] > 0
    assert put["nodes"] == ["site1", "site2", "site3", "site4", "site5"] and not put["failed"]
    # one-time pad: each stored byte costs one key byte per node link, plus 106 bytes per frame
    assert 5.0 <= put["key_per_byte"] < 5.01
    assert 4.0 <= get["key_per_byte"] < 4.01 and not get["bad"]
