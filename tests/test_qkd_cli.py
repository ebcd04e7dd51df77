"""`qstore qkd ...` as a user runs it: real processes."""

import itertools
import json
import subprocess
import sys


def qstore(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_rate_json_fields_and_physics():
    p = qstore("qkd", "rate", "--protocol", "decoy-bb84", "--distance", "0:200:20", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert [r["distance_km"] for r in rows] == [float(d) for d in range(0, 201, 20)]
    assert set(rows[0]) == {"distance_km", "rate_per_pulse", "rate_bps", "plob_per_pulse"}
    assert rows[0]["plob_per_pulse"] is None  # infinite at 0 km, and JSON has no infinity
    rates = [r["rate_per_pulse"] for r in rows]
    assert all(a >= b for a, b in itertools.pairwise(rates)) and rates[0] > 0 and rates[-1] == 0
    for r in rows[1:]:
        assert r["rate_per_pulse"] <= r["plob_per_pulse"]
        assert abs(r["rate_bps"] - 2e6 * r["rate_per_pulse"]) <= 1e-9 * max(1.0, r["rate_bps"])  # GYS: 2 MHz


def test_rate_table_and_plot(tmp_path):
    png = tmp_path / "rates.png"
    p = qstore("qkd", "rate", "--distance", "0:150:50", "--preset", "gys", "--plot", str(png))
    assert p.returncode == 0, p.stderr
    assert "PLOB" in p.stdout and "key bits/s" in p.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_rate_bad_input_is_one_line():
    for args in (["--distance", "9:1:1"], ["--protocol", "e91"], ["--plot", "/tmp/x.svg"]):
        p = qstore("qkd", "rate", *args)
        assert p.returncode != 0
        assert "Traceback" not in p.stderr and p.stderr.strip()


def test_bb84_reports_qber_and_equal_keys():
    p = qstore("qkd", "bb84", "--photons", "2e5", "--noise", "0.04", "--seed", "7", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["photons"] == 200_000 and r["sifted_bits"] > 90_000
    assert abs(r["qber"] - 0.02) < 0.005  # depolarising p gives QBER p/2
    assert r["keys_equal"] is True and not r["aborted"]
    assert 0 < r["final_key_bits"] < r["sifted_bits"] - r["sample_bits"] - r["leaked_bits"]


def test_bb84_full_intercept_resend_aborts():
    p = qstore("qkd", "bb84", "--photons", "1e5", "--eve", "--seed", "3", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["aborted"] is True and abs(r["qber"] - 0.25) < 0.02 and r["final_key_bits"] == 0
    text = qstore("qkd", "bb84", "--photons", "1e4", "--seed", "3")
    assert "qber" in text.stdout and "final key bits" in text.stdout
    bad = qstore("qkd", "bb84", "--noise", "2")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_simulate_tokyo_with_relayed_demand(tmp_path):
    png = tmp_path / "pools.png"
    p = qstore("qkd", "simulate", "deploy/tokyo.toml", "--hours", "24", "--demand", "koganei-hongo=100",
               "--json", "--plot", str(png))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    links = {row["link"]: row for row in out["links"]}
    assert out["network"] == "tokyo" and set(links) >= {"koganei-otemachi", "otemachi-hongo"}
    # 45 km at 0.3 dB/km makes far less key than 13 km at 0.5 dB/km, and both carry the relayed demand
    ko, ho = links["koganei-otemachi"], links["otemachi-hongo"]
    assert 0 < ko["rate_bps"] < ho["rate_bps"]
    assert abs(ko["final_bits"] - max(0.0, (ko["rate_bps"] - 100) * 86400)) < 1e-6 * ko["capacity_bits"] + 1
    hh = links["hakusan-hongo"]
    assert abs(hh["final_bits"] - hh["rate_bps"] * 86400) < 1e-6 * hh["final_bits"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_simulate_errors_are_one_line():
    for args in (["deploy/tokyo.toml", "--demand", "mars-hongo=5"], ["deploy/tokyo.toml", "--demand", "x"],
                 ["/nonexistent.toml"]):
        p = qstore("qkd", "simulate", *args)
        assert p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
