"""A throwaway PostgreSQL server for tests: initdb in a temporary directory, listening on 127.0.0.1 only.

Uses the Debian package's binaries (`.ci/run` installs `postgresql` when missing). Under root, the server
runs as the `postgres` user (PostgreSQL refuses to run as root).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def binaries() -> Path | None:
    """The directory of initdb and pg_ctl, newest version first; None when PostgreSQL is not installed."""
    found = glob.glob("/usr/lib/postgresql/*/bin")
    versions = sorted(found, key=lambda p: int(p.split("/")[-2]), reverse=True)
    for d in versions:
        if os.access(Path(d) / "initdb", os.X_OK):
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server() -> Iterator[str]:
    """Start a server with its data in a new temporary directory (its own: under root, the `postgres` user
    must reach it, and pytest's are private); yields the URL of its database ``qstore``; removes it all."""
    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="qstore-pg-"))
    try:
        yield from _serve(bin_dir, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _serve(bin_dir: Path, root: Path) -> Iterator[str]:
    data, sock = root / "data", root / "sock"
    sock.mkdir(exist_ok=True)
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str) -> None:
        res = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120, cwd="/")
        if res.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {res.stderr.strip() or res.stdout.strip()}")

    port = _free_port()
    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "qstore", "--auth=trust", "-E", "UTF8",
        "--no-locale", "--no-sync")
    opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60",
        "start")
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "qstore", "qstore")
        yield f"postgresql://qstore@127.0.0.1:{port}/qstore"
    finally:
        with contextlib.suppress(Exception):
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
