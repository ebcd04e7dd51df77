"""AWS Signature Version 4 verification, sans-IO: a request's parts in, a verdict out.

Covers what S3 clients send: the ``Authorization`` header, presigned query
strings (``X-Amz-*``, with expiry), ``UNSIGNED-PAYLOAD``, a hex SHA-256 of the
payload (checked by the caller as the body streams past), and the aws-chunked
encodings (``STREAMING-AWS4-HMAC-SHA256-PAYLOAD``, whose every chunk carries a
signature chained from the request's, and ``STREAMING-UNSIGNED-PAYLOAD-TRAILER``),
decoded incrementally by :class:`ChunkedDecoder`. Any region is accepted (the
scope's region is signed, so it only has to be consistent). Signatures are
compared in constant time; the clock is a parameter. Errors are
:class:`S3Error` with S3's code and status, and say nothing about which
intermediate value differed.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, unquote

from client.s3.errors import S3Error

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED = "UNSIGNED-PAYLOAD"
STREAMING = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
MAX_SKEW_S = 15 * 60
MAX_EXPIRES_S = 7 * 24 * 3600
MAX_CHUNK = 16 << 20  # larger aws-chunked chunks than any client sends are refused
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DATE = re.compile(r"\d{8}T\d{6}Z")
_CRED = re.compile(r"([^/]{1,128})/(\d{8})/([a-z0-9-]{1,32})/(s3)/aws4_request")


@dataclass(frozen=True)
class Request:
    """What a signature covers: method, the path as sent (percent-encoded), the query, the headers.

    ``query``: the raw query string (without '?'); ``headers``: name -> value,
    names in any case, repeated headers already joined with ','.
    """

    method: str
    raw_path: str
    query: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Auth:
    """A verified request: who signed it, and how its payload must be checked."""

    access_key: str
    payload: str  # UNSIGNED, STREAMING..., or the hex SHA-256 the body must have
    signature: str  # seed of a chunked payload's signature chain
    amz_date: str
    scope: str
    signing_key: bytes
    presigned: bool

    @property
    def streaming(self) -> bool:
        return self.payload in (STREAMING, STREAMING_UNSIGNED_TRAILER)


def _hmac(key: bytes, msg: str | bytes) -> bytes:
    return hmac.new(key, msg.encode() if isinstance(msg, str) else msg, hashlib.sha256).digest()


@functools.lru_cache(maxsize=256)
def signing_key(secret: str, date: str, region: str, service: str = "s3") -> bytes:
    """The derived key of one day, region and service (AWS's kDate → kRegion → kService → kSigning).

    Cached: it changes once a day per user and region, and costs four HMACs per request otherwise.
    """
    k = _hmac(("AWS4" + secret).encode(), date)
    return _hmac(_hmac(_hmac(k, region), service), "aws4_request")


def _uri_encode(s: str, *, slash: bool) -> str:
    return quote(s, safe="-_.~/" if not slash else "-_.~")


def parse_query(raw: str) -> list[tuple[str, str]]:
    """Decoded (name, value) pairs in order; '+' is a plus, as AWS clients encode spaces as %20."""
    out = []
    for part in raw.split("&") if raw else ():
        name, _, value = part.partition("=")
        out.append((unquote(name), unquote(value)))
    return out


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    enc = sorted((_uri_encode(k, slash=True), _uri_encode(v, slash=True)) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in enc)


def _header_map(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): " ".join(v.strip().split()) for k, v in headers.items()}


def canonical_request(req: Request, signed: list[str], payload: str, *, exclude: str = "",
                      path: str | None = None, hmap: Mapping[str, str] | None = None,
                      query: Iterable[tuple[str, str]] | None = None) -> str:
    """``hmap`` and ``query``: the request's headers and query already parsed (verify has them)."""
    hmap = _header_map(req.headers) if hmap is None else hmap
    missing = [h for h in signed if h not in hmap]
    if missing:
        raise S3Error("AccessDenied", "a signed header is missing from the request")
    pairs = [(k, v) for k, v in (parse_query(req.query) if query is None else query) if k != exclude]
    return "\n".join([req.method.upper(), req.raw_path if path is None else path, canonical_query(pairs),
                      "".join(f"{h}:{hmap[h]}\n" for h in signed), ";".join(signed), payload])


def string_to_sign(amz_date: str, scope: str, creq: str) -> str:
    return "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])


def _paths(raw_path: str) -> list[str]:
    """The path as sent, and re-encoded once (clients differ in which characters they escape)."""
    again = _uri_encode(unquote(raw_path), slash=False)
    return [raw_path] if again == raw_path else [raw_path, again]


def _parse_date(amz_date: str) -> float:
    if not _DATE.fullmatch(amz_date):
        raise S3Error("AccessDenied", "X-Amz-Date must be YYYYMMDDTHHMMSSZ")
    return datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.UTC).timestamp()


def _parse_authorization(value: str) -> tuple[str, list[str], str]:
    if not value.startswith(ALGORITHM + " "):
        raise S3Error("InvalidArgument", "only AWS4-HMAC-SHA256 signatures are supported")
    fields: dict[str, str] = {}
    for item in value[len(ALGORITHM) + 1:].split(","):
        name, sep, v = item.strip().partition("=")
        if not sep:
            raise S3Error("AuthorizationHeaderMalformed", "the Authorization header is malformed")
        fields[name] = v
    try:
        return fields["Credential"], fields["SignedHeaders"].split(";"), fields["Signature"]
    except KeyError:
        raise S3Error("AuthorizationHeaderMalformed", "the Authorization header is malformed") from None


def verify(req: Request, secret_of: Callable[[str], str | None], *, now: float) -> Auth:
    """Check ``req``'s signature (header or presigned); the :class:`Auth` to go on with.

    ``secret_of(access_key)``: the user's secret key, or None for an unknown key.
    """
    hmap = _header_map(req.headers)
    pairs = parse_query(req.query)
    query = dict(pairs)
    presigned = "X-Amz-Signature" in query
    if "authorization" in hmap:
        if presigned:
            raise S3Error("InvalidArgument", "only one authentication mechanism allowed")
        credential, signed, signature = _parse_authorization(hmap["authorization"])
        amz_date = hmap.get("x-amz-date", "")
        payload = hmap.get("x-amz-content-sha256", "")
        if not payload:
            raise S3Error("InvalidRequest", "missing required header for this request: x-amz-content-sha256")
    elif presigned:
        if query.get("X-Amz-Algorithm") != ALGORITHM:
            raise S3Error("InvalidArgument", "X-Amz-Algorithm only supports AWS4-HMAC-SHA256")
        credential, signature = query.get("X-Amz-Credential", ""), query["X-Amz-Signature"]
        signed = query.get("X-Amz-SignedHeaders", "").split(";")
        amz_date = query.get("X-Amz-Date", "")
        payload = query.get("X-Amz-Content-Sha256", hmap.get("x-amz-content-sha256", UNSIGNED))
    else:
        raise S3Error("AccessDenied", "anonymous access is not allowed")
    m = _CRED.fullmatch(credential)
    if m is None:
        raise S3Error("AuthorizationHeaderMalformed", "the credential scope is malformed")
    access_key, day, region, service = m.groups()
    if "host" not in signed or signed != sorted(signed) or any(not h for h in signed):
        raise S3Error("AuthorizationHeaderMalformed", "SignedHeaders must be sorted and include host")
    if not (_HEX64.fullmatch(signature)):
        raise S3Error("SignatureDoesNotMatch", "the signature is not 64 hex digits")
    if payload not in (UNSIGNED, STREAMING, STREAMING_UNSIGNED_TRAILER) and not _HEX64.fullmatch(payload):
        raise S3Error("InvalidArgument", "x-amz-content-sha256 must be a SHA-256 or a known payload mode")
    signed_at = _parse_date(amz_date)
    if amz_date[:8] != day:
        raise S3Error("SignatureDoesNotMatch", "the credential date is not the request's date")
    secret = secret_of(access_key)
    if secret is None:
        raise S3Error("InvalidAccessKeyId", "the access key ID does not exist")
    scope = f"{day}/{region}/{service}/aws4_request"
    key = signing_key(secret, day, region, service)
    good = False
    for path in _paths(req.raw_path):
        creq = canonical_request(req, signed, payload, exclude="X-Amz-Signature" if presigned else "",
                                 path=path, hmap=hmap, query=pairs)
        expected = _hmac(key, string_to_sign(amz_date, scope, creq)).hex()
        good |= hmac.compare_digest(expected, signature)
    if not good:
        raise S3Error("SignatureDoesNotMatch",
                      "the request signature we calculated does not match the signature you provided")
    if presigned:
        try:
            expires = int(query.get("X-Amz-Expires", ""))
        except ValueError:
            raise S3Error("AuthorizationQueryParametersError", "X-Amz-Expires must be a number") from None
        if not 1 <= expires <= MAX_EXPIRES_S:
            raise S3Error("AuthorizationQueryParametersError",
                          "X-Amz-Expires must be from 1 second to 7 days")
        if now > signed_at + expires:
            raise S3Error("AccessDenied", "request has expired")
        if signed_at > now + MAX_SKEW_S:
            raise S3Error("AccessDenied", "request is not valid yet")
    elif abs(now - signed_at) > MAX_SKEW_S:
        raise S3Error("RequestTimeTooSkewed",
                      "the difference between the request time and the server's time is too large")
    return Auth(access_key=access_key, payload=payload, signature=signature, amz_date=amz_date, scope=scope,
                signing_key=key, presigned=presigned)


def chunk_string_to_sign(auth: Auth, previous: str, data_sha256: str) -> str:
    return "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", auth.amz_date, auth.scope, previous, EMPTY_SHA256,
                      data_sha256])


class ChunkedDecoder:
    """The aws-chunked body decoder, h11 style: ``feed(bytes)`` then ``next()`` until it says "more".

    Each ``next()`` returns a piece of payload (bytes), :data:`NEED_DATA`, or
    :data:`END` after the final chunk (and its trailers). With ``auth`` of a
    signed streaming request every chunk's signature is checked, chained from
    the seed signature; a bad or missing one raises SignatureDoesNotMatch
    before the chunk's data is handed out. Buffers at most one chunk.
    """

    def __init__(self, auth: Auth | None, *, max_chunk: int = MAX_CHUNK):
        self._auth = auth if auth is not None and auth.payload == STREAMING else None
        self._previous = auth.signature if auth is not None else ""
        self._max = max_chunk
        self._buf = bytearray()
        self._state = "header"
        self._size = 0
        self._sig = ""
        self._closed = False
        self.decoded = 0

    def feed(self, data: bytes) -> None:
        if data:
            self._buf += data
        else:
            self._closed = True

    def _line(self, limit: int = 4096) -> str | None:
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > limit:
                raise S3Error("IncompleteBody", "an aws-chunked header line is too long")
            if self._closed:
                raise S3Error("IncompleteBody", "the body ended inside an aws-chunked header")
            return None
        if end > limit:
            raise S3Error("IncompleteBody", "an aws-chunked header line is too long")
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        try:
            return line.decode("ascii")
        except UnicodeDecodeError:
            raise S3Error("IncompleteBody", "an aws-chunked header is not ASCII") from None

    def next(self) -> bytes | object:
        while True:
            if self._state == "header":
                line = self._line()
                if line is None:
                    return NEED_DATA
                size_text, _, ext = line.partition(";")
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise S3Error("IncompleteBody", "an aws-chunked size is not hex") from None
                if not 0 <= size <= self._max or len(size_text) > 16:
                    raise S3Error("InvalidArgument", "aws-chunked chunk too large")
                sig = ""
                if ext:
                    name, _, value = ext.partition("=")
                    if name.strip() == "chunk-signature":
                        sig = value.strip()
                if self._auth is not None and not _HEX64.fullmatch(sig):
                    raise S3Error("SignatureDoesNotMatch", "a chunk has no signature")
                self._size, self._sig, self._state = size, sig, "data"
            elif self._state == "data":
                if len(self._buf) < self._size + 2:
                    if self._closed:
                        raise S3Error("IncompleteBody", "the body ended inside an aws-chunked chunk")
                    return NEED_DATA
                data = bytes(self._buf[: self._size])
                if self._size and self._buf[self._size : self._size + 2] != b"\r\n":
                    raise S3Error("IncompleteBody", "an aws-chunked chunk is not followed by CRLF")
                if self._auth is not None:
                    sts = chunk_string_to_sign(self._auth, self._previous, hashlib.sha256(data).hexdigest())
                    expected = _hmac(self._auth.signing_key, sts).hex()
                    if not hmac.compare_digest(expected, self._sig):
                        raise S3Error("SignatureDoesNotMatch", "a chunk's signature does not match")
                    self._previous = self._sig
                if self._size == 0:
                    self._state = "trailer"  # the final chunk: trailers (or the bare CRLF) follow
                    continue
                del self._buf[: self._size + 2]
                self._state = "header"
                self.decoded += len(data)
                return data
            elif self._state == "trailer":
                line = self._line()
                if line is None:
                    return NEED_DATA
                if line == "":
                    self._state = "end"
            else:
                if self._buf.strip():
                    raise S3Error("IncompleteBody", "data after the final aws-chunked chunk")
                return END


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Marker("NEED_DATA")
END = _Marker("END")
