"""The core stays sans-IO: nothing under qstore/ imports networking, event loops or clocks."""

import ast
import pathlib

import pytest

FORBIDDEN = {"asyncio", "aiohttp", "socket", "time", "datetime", "requests", "urllib", "http"}
CORE = sorted((pathlib.Path(__file__).parent.parent / "qstore").rglob("*.py"))


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_module_does_no_io(path):
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{path.name} imports {sorted(imported & FORBIDDEN)}"


def test_core_modules_found():
    names = {p.stem for p in CORE}
    assert {"gf256", "sharing", "decoding", "framing", "otp", "errors", "linmap", "rng", "_simd"} <= names
