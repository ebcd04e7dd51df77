"""The `qstore` command as a user runs it: a real process, real files."""

import json
import subprocess
import sys

import pytest


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_demo_json_verifies_and_shares_look_like_noise(tmp_path):
    p = run("demo", "--offline", "--size", "3M", "--json", "--workdir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["verified"] is True
    assert report["kept"] == [2, 4, 5] and report["dropped"] == [1, 3]
    assert report["size"] == 3 << 20
    assert report["original_entropy_bits_per_byte"] < 6
    assert all(e > 7.99 for e in report["share_entropy_bits_per_byte"])
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "patients.csv", "rebuilt.bin", "share-2.bin", "share-4.bin", "share-5.bin"]
    assert (tmp_path / "rebuilt.bin").read_bytes() == (tmp_path / "patients.csv").read_bytes()


def test_demo_text_output(tmp_path):
    p = run("demo", "--offline", "--size", "200k", "-k", "2", "-n", "3", "--strict-random",
            "--workdir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "identical" in p.stdout and "os.urandom" in p.stdout


@pytest.mark.parametrize("args,needle", [
    (["demo", "--offline", "-k", "6", "-n", "3"], "need 2 <= k <= n"),
    (["demo", "--offline", "--file", "/nonexistent/file"], "No such file"),
    (["demo", "--size", "12x"], "not a size"),
])
def test_errors_are_one_line_without_traceback(args, needle):
    p = run(*args)
    assert p.returncode != 0
    assert needle in p.stderr
    assert "Traceback" not in p.stderr
