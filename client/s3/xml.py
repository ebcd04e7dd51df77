"""S3's XML: response documents built from plain values, request documents parsed safely.

Building: :func:`document` turns nested ``(tag, value)`` pairs into S3's XML
(values escaped; a list value nests). Parsing: bodies are size-limited, any
DTD or entity declaration is refused before the parser sees it (so no entity
expansion of any kind), namespaces are dropped and the shape is checked; any
failure is MalformedXML.
"""

from __future__ import annotations

import datetime
import itertools
import xml.etree.ElementTree as ET  # DTDs refused before parsing (see parse)
from collections.abc import Iterable
from dataclasses import dataclass
from xml.sax.saxutils import escape

from client.s3.errors import S3Error

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
MAX_XML = 1 << 20  # CompleteMultipartUpload of 10,000 parts fits
MAX_PARTS = 10_000
MAX_DELETE = 1000

Value = str | int | bool | None | list[tuple[str, "Value"]]


def _text(v: str | int | bool) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return escape(str(v))


def _render(tag: str, value: Value, out: list[str]) -> None:
    if value is None:
        return
    if isinstance(value, list):
        out.append(f"<{tag}>")
        for t, v in value:
            _render(t, v, out)
        out.append(f"</{tag}>")
    else:
        out.append(f"<{tag}>{_text(value)}</{tag}>")


def document(root: str, children: list[tuple[str, Value]], *, namespace: bool = True) -> bytes:
    """``<root xmlns=...>children</root>`` with the XML declaration; None values are left out."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n', f'<{root} xmlns="{NS}">' if namespace else f"<{root}>"]
    for tag, v in children:
        _render(tag, v, out)
    out.append(f"</{root}>")
    return "".join(out).encode()


def error(code: str, message: str, *, resource: str = "", request_id: str = "") -> bytes:
    return document("Error", [("Code", code), ("Message", message), ("Resource", resource or None),
                              ("RequestId", request_id or None)], namespace=False)


def timestamp(t: float) -> str:
    """ISO 8601 with milliseconds and Z, as S3 lists times."""
    d = datetime.datetime.fromtimestamp(t, datetime.UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"


def http_date(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


# -- parsing ------------------------------------------------------------------------------------


def parse(body: bytes, root: str) -> ET.Element:
    """The root element of a request document, which must be ``root`` (any namespace)."""
    if len(body) > MAX_XML:
        raise S3Error("MalformedXML", "the XML document is too large")
    if b"<!" in body:  # DOCTYPE, ENTITY, CDATA: nothing an S3 request needs
        raise S3Error("MalformedXML", "DTDs, entities and CDATA are not accepted")
    try:
        elem = ET.fromstring(body)  # noqa: S314  # no DTD can reach here
    except ET.ParseError:
        raise S3Error("MalformedXML", "the XML you provided was not well-formed") from None
    for e in elem.iter():
        if isinstance(e.tag, str) and "}" in e.tag:
            e.tag = e.tag.split("}", 1)[1]
    if elem.tag != root:
        raise S3Error("MalformedXML", f"expected a {root} document")
    return elem


def _one(elem: ET.Element, tag: str, *, required: bool = True) -> str | None:
    found = elem.findall(tag)
    if len(found) > 1 or (required and not found):
        raise S3Error("MalformedXML", f"{elem.tag} needs exactly one {tag}")
    return (found[0].text or "") if found else None


@dataclass(frozen=True)
class PartRef:
    number: int
    etag: str


def parse_complete(body: bytes) -> list[PartRef]:
    """CompleteMultipartUpload: the parts, which must be in ascending order."""
    elem = parse(body, "CompleteMultipartUpload")
    parts = []
    for p in elem:
        if p.tag != "Part":
            raise S3Error("MalformedXML", "CompleteMultipartUpload holds Part elements only")
        try:
            number = int(_one(p, "PartNumber") or "")
        except ValueError:
            raise S3Error("MalformedXML", "PartNumber must be a number") from None
        if not 1 <= number <= MAX_PARTS:
            raise S3Error("InvalidArgument", "part numbers are 1 to 10000")
        etag = (_one(p, "ETag") or "").strip().strip('"')
        parts.append(PartRef(number, etag))
    if not parts:
        raise S3Error("MalformedXML", "CompleteMultipartUpload names no part")
    if len(parts) > MAX_PARTS:
        raise S3Error("MalformedXML", "too many parts")
    if any(a.number >= b.number for a, b in itertools.pairwise(parts)):
        raise S3Error("InvalidPartOrder", "the list of parts was not in ascending order")
    return parts


def parse_delete(body: bytes) -> tuple[bool, list[tuple[str, str | None]]]:
    """Delete (DeleteObjects): quiet flag and (key, version id) pairs, at most 1000."""
    elem = parse(body, "Delete")
    quiet = (_one(elem, "Quiet", required=False) or "false").strip().lower() == "true"
    objects = []
    for o in elem:
        if o.tag == "Quiet":
            continue
        if o.tag != "Object":
            raise S3Error("MalformedXML", "Delete holds Object elements only")
        key = _one(o, "Key") or ""
        objects.append((key, _one(o, "VersionId", required=False)))
    if not objects or len(objects) > MAX_DELETE:
        raise S3Error("MalformedXML", f"Delete names 1 to {MAX_DELETE} objects")
    return quiet, objects


def parse_bucket_config(body: bytes) -> str | None:
    """CreateBucketConfiguration's LocationConstraint (any region is accepted), or None for no body."""
    if not body.strip():
        return None
    return _one(parse(body, "CreateBucketConfiguration"), "LocationConstraint", required=False)


def owner(user: str) -> list[tuple[str, Value]]:
    return [("ID", user), ("DisplayName", user)]


def contents(rows: Iterable[tuple[str, Value]]) -> list[tuple[str, Value]]:
    return list(rows)
