"""Put and get throughput through a local cluster of real processes, with the client's peak RSS.

What it measures: ``qstore cluster up`` of ``deploy/local.toml`` (5 sites, one KME and
one node each, (k, n) = (3, 5), unlimited-rate QKD links) in a temporary state
directory; then ``qstore put FILE`` and ``qstore get NAME`` of one random file, each run
as its own client process (the CLI a user runs), OTP on every link unless
``--link-cipher`` says otherwise. For each direction:

* ``put`` / ``get``: MB/s of file bytes (1 MB = 10^6 bytes) over the operation's own time
  (the client's report: from the first chunk read to the commit, or to the last byte
  checked), and over the whole process run (Python start-up included);
* ``client_peak_rss_mib``: the client process's peak RSS (``wait4`` ru_maxrss);
* ``key_per_byte``: QKD key bytes spent on all links per stored (or fetched) file byte.

Targets from the storage issue, compared in the same run: put >= 100 MB/s, get >= 150 MB/s,
client peak RSS < 300 MiB for a 1 GiB file, all on a 2-core machine with every process
(5 KMEs + client KME, 5 nodes, the client) sharing those cores.

Run::

    python bench/storage.py                  # 1 GiB
    python bench/storage.py --size 256MiB    # what CI-sized runs use
    python bench/storage.py --quick          # 16 MiB, a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import MiB, cpu_model, emit, log, mbps, parse_size

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"put": 100.0, "get": 150.0}
RSS_TARGET_MIB = 300.0


def qstore(*args: str, state: Path) -> list[str]:
    return [sys.executable, "-m", "client.cli", *args, "--state", str(state)]


def run_measured(cmd: list[str]) -> tuple[dict, float, float]:
    """Run a client process; its JSON report, wall seconds and peak RSS in MiB."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:5])} failed: {err.decode(errors='replace').strip()}")
    return json.loads(out), wall, usage.ru_maxrss / 1024


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=1024 * MiB)
    ap.add_argument("--quick", action="store_true", help="16 MiB: a smoke test")
    ap.add_argument("--link-cipher", default="otp", choices=("otp", "aes-256-gcm"))
    ap.add_argument("--config", type=Path, default=ROOT / "deploy" / "local.toml")
    args = ap.parse_args()
    size = 16 * MiB if args.quick else args.size
    emit({"bench": "storage", "cpu_model": cpu_model(), "cpus": os.cpu_count(),
          "python": sys.version.split()[0], "size_bytes": size, "link_cipher": args.link_cipher})
    with tempfile.TemporaryDirectory(prefix="qstore-bench-") as tmp:
        tmp_path = Path(tmp)
        state = tmp_path / "state"
        data = tmp_path / "data.bin"
        back = tmp_path / "back.bin"
        log(f"writing {size / MiB:.0f} MiB of random data")
        write_random(data, size)
        log("starting the cluster")
        subprocess.run(qstore("cluster", "up", str(args.config), state=state), check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        try:
            results = {}
            log("put")
            put = qstore("put", str(data), "bench.bin", "--json", "--link-cipher", args.link_cipher,
                         state=state)
            report, wall, rss = run_measured(put)
            results["put"] = (report, wall, rss)
            os.sync()
            log("get")
            get = qstore("get", "bench.bin", "-o", str(back), "--json", state=state)
            report, wall, rss = run_measured(get)
            results["get"] = (report, wall, rss)
            if back.stat().st_size != size or _digest(back) != _digest(data):
                raise SystemExit("get returned other bytes than put stored")
            for op, (report, wall, rss) in results.items():
                rate = mbps(size, report["seconds"])
                emit({"figure": op, "mbps": rate, "mbps_process": mbps(size, wall),
                      "seconds": report["seconds"],
                      "target_mbps": TARGETS[op], "meets_target": rate >= TARGETS[op],
                      "client_peak_rss_mib": round(rss, 1), "rss_target_mib": RSS_TARGET_MIB,
                      "key_per_byte": round(report["key_bytes"] / size, 3),
                      "nodes": report["nodes"], "bad": report["bad"], "failed": report["failed"]})
        finally:
            subprocess.run(qstore("cluster", "down", state=state), cwd=ROOT, stdout=subprocess.DEVNULL)


def _digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(16 * MiB):
            h.update(block)
    return h.hexdigest()


if __name__ == "__main__":
    main()
