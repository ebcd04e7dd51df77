"""The KME benchmark runs against real KMEs over mTLS and prints well-formed JSON figures (smoke run)."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench" / "kme.py"


def positive(value: object) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def test_kme_bench_quick_prints_json_figures():
    p = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert all(isinstance(d, dict) and "figure" in d for d in lines)
    assert lines[0]["figure"] == "environment" and lines[0]["tls"] == "TLSv1.3"
    assert lines[0]["kmes"] == "process" and lines[0]["base64"] in ("vbmi512", "numpy")

    delivery = [d for d in lines if d["figure"] == "key_delivery"]
    assert {d["key_bytes"] for d in delivery} == {1024, 1048576}
    assert {(d["key_bytes"], d["concurrency"]) for d in delivery} >= {(1024, 1), (1048576, 1)}
    for d in delivery:
        assert all(positive(d[k]) for k in ("keys_per_request", "request_pairs", "key_MiB", "seconds", "MBps",
                                            "keys_per_s")), d

    (bound,) = [d for d in lines if d["figure"] == "transport_bound"]
    assert bound["key_bytes"] == 1048576 and all(positive(bound[k]) for k in ("key_MiB", "seconds", "MBps"))

    rates = [d for d in lines if d["figure"] == "request_rate"]
    assert {(d["what"].split()[0], d["concurrency"]) for d in rates} == {
        ("status", 1), ("status", 16), ("enc_keys", 1), ("enc_keys", 16)}
    for d in rates:
        assert all(positive(d[k]) for k in ("requests", "seconds", "rps", "ms_per_request")), d

    (target,) = [d for d in lines if d["figure"] == "target"]
    assert target["what"] == "enc+dec 1 MiB keys MB/s" and target["target"] == 300
    assert positive(target["value"]) and target["met"] == (target["value"] >= 300)
    assert lines[-1] is target
