"""docs/architecture.svg is exactly what docs/architecture.py draws from its text."""

from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _module():
    spec = importlib.util.spec_from_file_location("architecture", DOCS / "architecture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_committed_diagram_is_generated_from_its_text():
    mod = _module()
    svg = mod.draw()
    assert (DOCS / "architecture.svg").read_text(encoding="utf-8") == svg, "run python docs/architecture.py"
    root = ET.fromstring(svg)
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {"KME site 1", "node 1 (x = 1)", "S3 gateway", "web console"} <= texts


def test_a_bad_edge_is_refused():
    with pytest.raises(ValueError, match="unknown box"):
        _module().parse("a | 0 | 0 | A | a | kme\na | b | x | qkd")
