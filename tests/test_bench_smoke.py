"""The benchmark runs and prints well-formed JSON figures (smoke run, not a timing test)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench" / "sharing.py"


def test_sharing_bench_quick_prints_json_figures():
    p = subprocess.run([sys.executable, str(BENCH), "--quick", "--skip-rss"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    figures = {(d["figure"], d.get("k"), d.get("n"), d.get("mode")) for d in lines}
    for k, n in ((2, 3), (3, 5), (5, 9)):
        for fig in ("split", "combine", "zfec_encode"):
            assert (fig, k, n, "chunked-4MiB") in figures
    ratios = [d for d in lines if d["figure"] == "ratio" and d["what"].endswith("zfec_encode")
              and (d["k"], d["n"]) == (3, 5)]
    assert {r["target"] for r in ratios} == {2.0, 4.0}
    assert all(r["value"] > 0 for r in ratios)
    assert all(d["MBps"] > 0 for d in lines if "MBps" in d)
