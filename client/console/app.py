"""The web console: an aiohttp app serving a single-page UI (``static/``) and a JSON API under ``/api/``.

Authentication: the S3 gateway's users (access key + secret key, from
``cluster.json``'s ``gateway`` section, the gateway's credentials file, and/or
``ConsoleConfig.users_file``). A login yields a session cookie (HttpOnly,
SameSite=Strict, a random 256-bit token; sessions live server-side and
expire). Every state-changing request must carry the session's CSRF token
in ``X-CSRF-Token`` (the JS reads it from the non-HttpOnly ``qs_csrf``
cookie: double submit) and, when the browser names one, an Origin (or
Referer) of this very host. Secrets are compared in constant time.

Objects are listed, uploaded (streamed into :meth:`QStore.put`),
downloaded (streamed from :meth:`QStore.get`) and deleted in the buckets
the logged-in user may use. Statistics run as the console's SAE
(``ConsoleConfig.sae``, ``client`` by default): its grants decide which
tables may be queried.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from qstore.errors import LocalError, QStoreError

STATIC = Path(__file__).resolve().parent / "static"
SESSION_COOKIE = "qs_session"
CSRF_COOKIE = "qs_csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_PAGE = 1000
STATUS_CACHE_S = 2.0
MAX_SESSIONS = 10_000
_DUMMY_SECRET = secrets.token_urlsafe(30)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ConsoleConfig:
    state: Path
    sae: str = "client"
    users_file: Path | None = None
    session_ttl_s: float = 8 * 3600.0
    idle_ttl_s: float = 3600.0


    def users(self) -> list[Any]:
        """Who may log in now (see :meth:`Console.users`)."""
        return Console(self).users()


@dataclass
class Session:
    user: Any  # client.s3.users.User
    csrf: str
    expires: float  # absolute end (monotonic)
    idle_until: float


@dataclass
class Console:
    config: ConsoleConfig
    sessions: dict[str, Session] = field(default_factory=dict)
    _qs: Any = None
    _qs_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _status: tuple[float, dict[str, Any]] | None = None
    _status_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # -- users and sessions ------------------------------------------------------------

    def users(self) -> list[Any]:
        """The gateway's users, read afresh (``cluster up`` draws new keys each time)."""
        from client.s3.users import User, Users

        found: list[Any] = []
        if self.config.users_file is not None:
            found += list(Users.load(self.config.users_file)._by_key.values())
        doc = _read_json(self.config.state / "cluster.json")
        gw = doc.get("gateway") if isinstance(doc, dict) else None
        if isinstance(gw, dict):
            creds = gw.get("credentials")
            if isinstance(creds, str) and Path(creds).is_file():
                with contextlib.suppress(LocalError, OSError):
                    found += list(Users.load(Path(creds))._by_key.values())
            if isinstance(gw.get("access_key"), str) and isinstance(gw.get("secret_key"), str):
                with contextlib.suppress(LocalError):
                    found.append(User(name="admin", access_key=gw["access_key"], secret_key=gw["secret_key"],
                                      buckets=frozenset({"*"})))
        return found

    def authenticate(self, access_key: str, secret_key: str) -> Any:
        """The user with these keys, or None; every candidate is compared in constant time."""
        match = None
        for user in self.users():
            key_ok = hmac.compare_digest(user.access_key.encode(), access_key.encode())
            secret = user.secret_key if key_ok else _DUMMY_SECRET
            if hmac.compare_digest(secret.encode(), secret_key.encode()) and key_ok and match is None:
                match = user
        return match

    def new_session(self, user: Any) -> tuple[str, Session]:
        now = time.monotonic()
        self.sessions = {t: s for t, s in self.sessions.items() if _live(s, now)}
        if len(self.sessions) >= MAX_SESSIONS:
            oldest = min(self.sessions, key=lambda t: self.sessions[t].expires)
            del self.sessions[oldest]
        token = secrets.token_urlsafe(32)  # 256 bits
        s = Session(user=user, csrf=secrets.token_urlsafe(32), expires=now + self.config.session_ttl_s,
                    idle_until=now + min(self.config.idle_ttl_s, self.config.session_ttl_s))
        self.sessions[token] = s
        return token, s

    def session_of(self, request: web.Request) -> Session | None:
        token = request.cookies.get(SESSION_COOKIE, "")
        s = self.sessions.get(token) if token else None
        now = time.monotonic()
        if s is None:
            return None
        if not _live(s, now):
            self.sessions.pop(token, None)
            return None
        s.idle_until = min(s.expires, now + self.config.idle_ttl_s)
        return s

    # -- the cluster ---------------------------------------------------------------------

    async def qs(self) -> Any:
        async with self._qs_lock:
            if self._qs is None:
                from client.storage import QStore
                from qstore.cluster import ClusterState

                # long-lived, as the S3 gateway: small uploads take key fetched ahead
                qs = QStore(ClusterState.load(self.config.state), sae_id=self.config.sae, node_timeout_s=120,
                            key_ahead=True)
                await qs.__aenter__()
                self._qs = qs
            return self._qs

    async def close(self) -> None:
        if self._qs is not None:
            await self._qs.close()
            self._qs = None

    async def status(self) -> dict[str, Any]:
        async with self._status_lock:
            now = time.monotonic()
            if self._status is None or now - self._status[0] > STATUS_CACHE_S:
                from client import cluster

                report = await asyncio.to_thread(cluster.status, self.config.state)
                self._status = (time.monotonic(), _finite(report))
            return self._status[1]


def _live(s: Session, now: float) -> bool:
    return now < s.expires and now < s.idle_until


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _finite(obj: Any) -> Any:
    """JSON has no infinity or NaN: such numbers become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


CONSOLE = web.AppKey("console", Console)


def _session(request: web.Request) -> Session:
    """The request's session (the auth middleware let the request through only with one)."""
    s = request.app[CONSOLE].session_of(request)
    if s is None:
        raise web.HTTPUnauthorized(reason="not logged in")
    return s


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(_finite(data), default=str), status=status,
                        content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


# -- middlewares -------------------------------------------------------------------------

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        if not request.path.startswith("/api/") or exc.status < 400:
            raise
        resp = _error(exc.status, exc.reason)
    if not resp.prepared:
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        if request.path.startswith("/api/"):
            resp.headers.setdefault("Cache-Control", "no-store")
    return resp


def _same_origin(request: web.Request) -> bool:
    """When the browser names where a request comes from (Origin, else Referer), it must be this host."""
    host = request.headers.get("Host", "")
    origin = request.headers.get("Origin")
    if origin is None:
        ref = request.headers.get("Referer")
        if ref is None:
            return True  # not a browser's cross-site request: the CSRF token still decides
        origin = ref
    if origin == "null":
        return False
    parsed = urllib.parse.urlsplit(origin)
    return bool(host) and parsed.netloc == host and parsed.scheme in ("http", "https")


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/api/"):
        return await handler(request)
    console: Console = request.app[CONSOLE]
    state_changing = request.method not in SAFE_METHODS
    if state_changing and not _same_origin(request):
        return _error(403, "cross-origin request refused")
    if request.path == "/api/login":
        return await handler(request)
    s = console.session_of(request)
    if s is None:
        return _error(401, "not logged in")
    if state_changing:
        given = request.headers.get(CSRF_HEADER, "")
        if not given or not hmac.compare_digest(given.encode(), s.csrf.encode()):
            return _error(403, "missing or wrong CSRF token")
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except QStoreError as exc:
        status = getattr(exc, "status", None)
        status = status if isinstance(status, int) and 400 <= status < 600 else 502
        if isinstance(exc, LocalError) and status == 502:
            status = 400
        return _error(status, str(exc))
    except (OSError, TimeoutError) as exc:  # the cluster is down or unreachable
        return _error(502, f"cluster unreachable ({type(exc).__name__}: {exc})")


# -- handlers ----------------------------------------------------------------------------

def _set_cookies(resp: web.StreamResponse, token: str, csrf: str) -> None:
    resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="Strict", path="/")
    resp.set_cookie(CSRF_COOKIE, csrf, httponly=False, samesite="Strict", path="/")


async def login(request: web.Request) -> web.Response:
    console: Console = request.app[CONSOLE]
    try:
        body = await request.json()
        access, secret = str(body["access_key"]), str(body["secret_key"])
    except (ValueError, KeyError, TypeError):
        return _error(400, "send {\"access_key\": ..., \"secret_key\": ...}")
    user = console.authenticate(access, secret)
    if user is None:
        await asyncio.sleep(0.2)  # slows guessing a little
        return _error(401, "wrong access key or secret key")
    token, s = console.new_session(user)
    resp = _json({"user": user.name, "csrf": s.csrf, "buckets": sorted(user.buckets)})
    _set_cookies(resp, token, s.csrf)
    return resp


async def logout(request: web.Request) -> web.Response:
    console: Console = request.app[CONSOLE]
    console.sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
    resp = _json({"ok": True})
    resp.del_cookie(SESSION_COOKIE, path="/")
    resp.del_cookie(CSRF_COOKIE, path="/")
    return resp


async def me(request: web.Request) -> web.Response:
    s: Session = _session(request)
    console: Console = request.app[CONSOLE]
    return _json({"user": s.user.name, "csrf": s.csrf, "buckets": sorted(s.user.buckets),
                  "sae": console.config.sae})


async def network(request: web.Request) -> web.Response:
    report = await request.app[CONSOLE].status()
    sites: dict[str, dict[str, Any]] = {}
    for p in report["processes"]:
        site = sites.setdefault(p["site"], {"name": p["site"], "processes": []})
        site["processes"].append({"kind": p["kind"], "id": p["id"], "health": p["health"],
                                  "reachable": p["reachable"], "alive": p["alive"]})
    for lk in report["links"]:
        for end in (lk["a"], lk["b"]):
            sites.setdefault(end, {"name": end, "processes": []})
    return _json({"name": report["name"], "k": report["k"], "n": report["n"], "sites": list(sites.values()),
                  "links": report["links"], "time": time.time()})


async def nodes(request: web.Request) -> web.Response:
    report = await request.app[CONSOLE].status()
    procs = [{k: p.get(k) for k in ("kind", "id", "site", "pid", "local", "alive", "url", "health",
                                    "reachable", "figures")} for p in report["processes"]]
    return _json({"name": report["name"], "k": report["k"], "n": report["n"], "processes": procs})


def _bucket(request: web.Request, bucket: str | None = None) -> str:
    bucket = bucket if bucket is not None else request.query.get("bucket", "")
    if not bucket:
        raise web.HTTPBadRequest(reason="name a bucket")
    if not _session(request).user.may_use(bucket):
        raise web.HTTPForbidden(reason=f"you may not use bucket {bucket}")
    return bucket


async def buckets(request: web.Request) -> web.Response:
    qs = await request.app[CONSOLE].qs()
    user = _session(request).user
    return _json({"buckets": [b for b in await qs.list_buckets() if user.may_use(b)]})


async def create_bucket(request: web.Request) -> web.Response:
    try:
        name = str((await request.json())["name"])
    except (ValueError, KeyError, TypeError):
        return _error(400, "send {\"name\": ...}")
    bucket = _bucket(request, name)
    qs = await request.app[CONSOLE].qs()
    created = await qs.create_bucket(bucket)
    return _json({"bucket": bucket, "created": created})


async def objects(request: web.Request) -> web.Response:
    bucket = _bucket(request)
    try:
        limit = max(1, min(int(request.query.get("limit", "100")), MAX_PAGE))
    except ValueError:
        return _error(400, "limit must be a number")
    qs = await request.app[CONSOLE].qs()
    page = await qs.list(bucket, request.query.get("prefix", ""), start_after=request.query.get("after", ""),
                         limit=limit + 1)
    more = len(page) > limit
    page = page[:limit]
    return _json({"bucket": bucket, "objects": [{"key": o.key, "size": o.size, "committed_at": o.committed_at,
                                                 "holders": list(o.holders)} for o in page],
                  "next": page[-1].key if more else None})


def _key(request: web.Request) -> str:
    key = request.query.get("key", "")
    if not key:
        raise web.HTTPBadRequest(reason="name a key")
    return key


async def upload(request: web.Request) -> web.Response:
    bucket, key = _bucket(request), _key(request)
    qs = await request.app[CONSOLE].qs()
    if request.content_length is None:
        return _error(411, "send Content-Length")
    report = await qs.put(bucket, key, request.content, size=request.content_length)
    return _json({"bucket": bucket, "key": key, "size": report.size, "nodes": report.nodes,
                  "seconds": report.seconds})


async def download(request: web.Request) -> web.StreamResponse:
    bucket, key = _bucket(request), _key(request)
    qs = await request.app[CONSOLE].qs()
    info = await qs.head(bucket, key)
    resp = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": "attachment; filename*=UTF-8''" + urllib.parse.quote(key.rsplit("/", 1)[-1]),
        "Content-Length": str(info.size), "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
    await resp.prepare(request)
    await qs.get(bucket, key, resp)
    await resp.write_eof()
    return resp


async def delete(request: web.Request) -> web.Response:
    bucket, key = _bucket(request), _key(request)
    qs = await request.app[CONSOLE].qs()
    await qs.delete(bucket, key)
    return _json({"deleted": key})


async def tables(request: web.Request) -> web.Response:
    qs = await request.app[CONSOLE].qs()
    return _json({"tables": await qs.tables().list()})


async def table(request: web.Request) -> web.Response:
    qs = await request.app[CONSOLE].qs()
    return _json(await qs.tables().describe(request.match_info["name"]))


async def query(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        names = [t for t in str(body["table"]).split(",") if t]
        op = str(body["op"])
        columns = [str(c) for c in body.get("columns") or []]
        where = body.get("where") or None
        group_by = [str(g) for g in body.get("group_by") or []]
    except (ValueError, KeyError, TypeError):
        return _error(400, "send {\"table\", \"op\", \"columns\", \"where\", \"group_by\"}")
    qs = await request.app[CONSOLE].qs()
    ref = qs.table(*names)
    try:
        if where:
            ref = ref.where(str(where))
        if group_by:
            ref = ref.group_by(*group_by)
        params: dict[str, Any] = {}
        if body.get("q") not in (None, ""):
            params["q"] = body["q"]
        if body.get("bins"):
            params["bins"] = [b.strip() for b in str(body["bins"]).split(",") if b.strip()]
        results = await ref.run(op, *columns, **params)
    except (ValueError, TypeError) as exc:
        return _error(400, str(exc))
    rep = results.report
    return _json({"results": results.to_json(), "report": {"nodes": rep.nodes, "rounds": rep.rounds,
                                                           "seconds": rep.seconds,
                                                           "key_spent_bytes": rep.key_spent_bytes}})


async def planner_options(request: web.Request) -> web.Response:
    from qkd_sim import models

    return _json({"protocols": list(models.PROTOCOLS), "presets": sorted(models.PRESETS),
                  "default_protocol": "decoy-bb84", "default_preset": "gys"})


async def planner(request: web.Request) -> web.Response:
    from dataclasses import replace

    import numpy as np

    from qkd_sim import models

    q = request.query
    protocol, preset = q.get("protocol", "decoy-bb84"), q.get("preset", "gys")
    if protocol not in models.PROTOCOLS or preset not in models.PRESETS:
        return _error(400, "unknown protocol or hardware preset")
    try:
        start, stop, step = (float(q.get(n, d)) for n, d in (("start", "0"), ("stop", "200"), ("step", "10")))
        if not (0 <= start <= stop and step > 0 and (stop - start) / step <= 2000):
            raise ValueError
        hw = models.PRESETS[preset]
        if q.get("loss"):
            hw = replace(hw, fiber_loss_db_per_km=float(q["loss"]))
        params = {"mu": float(q["mu"])} if q.get("mu") else {}
        d = np.arange(start, stop + step / 2, step)
        with np.errstate(divide="ignore"):
            per_pulse = np.atleast_1d(await asyncio.to_thread(models.key_rate, protocol, d, hw, **params))
            plob = np.atleast_1d(models.plob(d, hw))
    except (ValueError, QStoreError) as exc:
        return _error(400, str(exc) or "distances: 0 <= start <= stop, step > 0, at most 2000 points")
    hz = hw.repetition_rate_hz
    rows = [{"distance_km": float(x), "rate_per_pulse": float(r), "rate_bps": float(r * hz),
             "plob_bps": float(p * hz)} for x, r, p in zip(d, per_pulse, plob, strict=True)]
    return _json({"protocol": protocol, "preset": preset, "repetition_rate_hz": hw.repetition_rate_hz,
                  "rows": rows})


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


# -- the app -----------------------------------------------------------------------------

def create_app(config: ConsoleConfig) -> web.Application:
    app = web.Application(middlewares=[_headers, _auth])
    console = Console(config)
    app[CONSOLE] = console

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        yield
        await console.close()

    app.cleanup_ctx.append(lifetime)
    r = app.router
    r.add_get("/", index)
    r.add_static("/static/", STATIC, show_index=False)
    r.add_post("/api/login", login)
    r.add_post("/api/logout", logout)
    r.add_get("/api/me", me)
    r.add_get("/api/network", network)
    r.add_get("/api/nodes", nodes)
    r.add_get("/api/buckets", buckets)
    r.add_post("/api/buckets", create_bucket)
    r.add_get("/api/objects", objects)
    r.add_get("/api/object", download)
    r.add_put("/api/object", upload)
    r.add_delete("/api/object", delete)
    r.add_get("/api/tables", tables)
    r.add_get("/api/tables/{name}", table)
    r.add_post("/api/query", query)
    r.add_get("/api/planner/options", planner_options)
    r.add_get("/api/planner", planner)
    return app
