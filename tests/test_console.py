"""The web console (`qstore console`): its API's security without a browser, then end to end in headless
Chromium (Playwright driving Debian's /usr/bin/chromium) against a real cluster of processes.

Screenshots of every page go to ``$QSTORE_TEST_ARTIFACTS`` when set, else to a directory under pytest's
tmp dir (printed by the browser test).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from client import cluster
from client.console.app import CONSOLE, CSRF_COOKIE, SESSION_COOKIE, ConsoleConfig, create_app
from client.s3 import users as s3users
from client.storage import QStore
from qstore.cluster import ClusterState

CHROMIUM = "/usr/bin/chromium"
SITES = ("s1", "s2", "s3")
ROWS = 400
SCHEMA = """
[table]
min_group_size = 10
[columns]
age    = { type = "integer", min = 0, max = 120 }
sex    = { type = "categorical", values = ["M", "F"] }
weight = { type = "fixed", decimals = 1, min = 20, max = 250 }
"""


# -- the API without a browser (no cluster needed) -----------------------------------------------------


@pytest.fixture
def creds(tmp_path):
    alice = s3users.new_user("alice", ["reports"])
    path = tmp_path / "users.json"
    s3users.write(path, [alice])
    return path, alice


async def _client(tmp_path: Path, users: Path, **kw) -> TestClient:
    app = create_app(ConsoleConfig(state=tmp_path / "no-cluster", users_file=users, **kw))
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def _login(client: TestClient, user) -> dict:
    body = {"access_key": user.access_key, "secret_key": user.secret_key}
    resp = await client.post("/api/login", json=body)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_the_api_refuses_unauthenticated_calls(tmp_path, creds):
    client = await _client(tmp_path, creds[0])
    try:
        for method, path in (("GET", "/api/me"), ("GET", "/api/network"), ("GET", "/api/nodes"),
                             ("GET", "/api/buckets"), ("GET", "/api/objects?bucket=reports"),
                             ("GET", "/api/object?bucket=reports&key=a"), ("GET", "/api/tables"),
                             ("GET", "/api/planner"), ("POST", "/api/query"),
                             ("PUT", "/api/object?bucket=r&key=a"),
                             ("DELETE", "/api/object?bucket=r&key=a"), ("POST", "/api/logout")):
            resp = await client.request(method, path, headers={"X-CSRF-Token": "x"})
            assert resp.status == 401, (method, path, resp.status)
            assert "not logged in" in (await resp.json())["error"]
        resp = await client.request("PUT", "/api/object?bucket=r&key=a", data=b"x")
        assert resp.status == 401
        # a forged cookie is no session either
        client.session.cookie_jar.update_cookies({SESSION_COOKIE: "A" * 43})
        assert (await client.get("/api/me")).status == 401
        page = await client.get("/")
        assert page.status == 200 and "Content-Security-Policy" in page.headers
        assert "<script src=\"/static/app.js\"" in await page.text()
        assert (await client.get("/static/app.js")).status == 200
    finally:
        await client.close()


async def test_login_failure_sets_no_cookie(tmp_path, creds):
    _, alice = creds
    client = await _client(tmp_path, creds[0])
    try:
        for body in ({"access_key": alice.access_key, "secret_key": alice.secret_key[:-1] + "#"},
                     {"access_key": "QS" + "A" * 18, "secret_key": alice.secret_key},
                     {"access_key": alice.access_key, "secret_key": ""}):
            resp = await client.post("/api/login", json=body)
            assert resp.status == 401 and "wrong access key or secret key" in (await resp.json())["error"]
            assert SESSION_COOKIE not in resp.cookies
        resp = await client.post("/api/login", data=b"not json")
        assert resp.status == 400
        resp = await client.post("/api/login", json={"access_key": alice.access_key,
                                                     "secret_key": alice.secret_key},
                                 headers={"Origin": "http://evil.example"})
        assert resp.status == 403 and SESSION_COOKIE not in resp.cookies
        assert (await client.get("/api/me")).status == 401
    finally:
        await client.close()


async def test_login_csrf_and_logout(tmp_path, creds):
    _, alice = creds
    client = await _client(tmp_path, creds[0])
    try:
        resp = await client.post("/api/login", json={"access_key": alice.access_key,
                                                     "secret_key": alice.secret_key})
        assert resp.status == 200
        raw = {c.key: c for c in resp.cookies.values()}
        session = raw[SESSION_COOKIE]
        assert session["httponly"] and session["samesite"] == "Strict" and len(session.value) >= 43
        assert not raw[CSRF_COOKIE]["httponly"] and raw[CSRF_COOKIE]["samesite"] == "Strict"
        body = await resp.json()
        csrf = body["csrf"]
        assert body["user"] == "alice" and raw[CSRF_COOKIE].value == csrf and csrf != session.value
        me = await client.get("/api/me")
        assert me.status == 200 and (await me.json())["buckets"] == ["reports"]
        # state-changing requests: refused without the header, with a wrong one, or from another origin
        assert (await client.post("/api/logout")).status == 403
        assert (await client.post("/api/logout", headers={"X-CSRF-Token": csrf[:-1] + "x"})).status == 403
        assert (await client.post("/api/buckets", json={"name": "reports"})).status == 403
        assert (await client.put("/api/object?bucket=reports&key=a", data=b"x")).status == 403
        assert (await client.delete("/api/object?bucket=reports&key=a")).status == 403
        assert (await client.post("/api/query", json={})).status == 403
        evil = {"X-CSRF-Token": csrf, "Origin": "http://evil.example"}
        assert (await client.post("/api/logout", headers=evil)).status == 403
        assert (await client.post("/api/logout", headers={"X-CSRF-Token": csrf,
                                                          "Referer": "http://evil.example/x"})).status == 403
        # no cluster behind this console: a clear error, not a crash
        for path in ("/api/buckets", "/api/objects?bucket=reports", "/api/network", "/api/tables"):
            resp = await client.get(path)
            assert resp.status in (400, 502, 503) and "error" in await resp.json(), path
        # a bucket the user may not use, even with the token
        resp = await client.get("/api/objects?bucket=other")
        assert resp.status == 403
        # still logged in; the right token (and this very origin) logs out
        assert (await client.get("/api/me")).status == 200
        host = f"http://{client.host}:{client.port}"
        resp = await client.post("/api/logout", headers={"X-CSRF-Token": csrf, "Origin": host})
        assert resp.status == 200
        client.session.cookie_jar.update_cookies({SESSION_COOKIE: session.value})  # replaying the old token
        assert (await client.get("/api/me")).status == 401
    finally:
        await client.close()


async def test_sessions_expire(tmp_path, creds):
    _, alice = creds
    client = await _client(tmp_path, creds[0], session_ttl_s=0.5, idle_ttl_s=0.5)
    try:
        await _login(client, alice)
        assert (await client.get("/api/me")).status == 200
        await asyncio.sleep(0.7)
        assert (await client.get("/api/me")).status == 401
        assert not client.app[CONSOLE].sessions  # gone from the store too
    finally:
        await client.close()
    client = await _client(tmp_path, creds[0], session_ttl_s=60, idle_ttl_s=0.4)
    try:
        await _login(client, alice)
        for _ in range(3):  # use keeps an idle-limited session alive ...
            await asyncio.sleep(0.2)
            assert (await client.get("/api/me")).status == 200
        await asyncio.sleep(0.6)  # ... idleness ends it
        assert (await client.get("/api/me")).status == 401
    finally:
        await client.close()


async def test_planner_draws_the_models_curve(tmp_path, creds):
    from qkd_sim import models

    client = await _client(tmp_path, creds[0])
    try:
        await _login(client, creds[1])
        resp = await client.get("/api/planner?protocol=decoy-bb84&preset=gys&start=0&stop=100&step=25")
        assert resp.status == 200
        rows = (await resp.json())["rows"]
        hw = models.PRESETS["gys"]
        want = models.key_rate("decoy-bb84", np.array([0, 25, 50, 75, 100.0]), hw) * hw.repetition_rate_hz
        assert [r["distance_km"] for r in rows] == [0, 25, 50, 75, 100]
        assert [r["rate_bps"] for r in rows] == pytest.approx(list(want))
        assert (await client.get("/api/planner?protocol=nope")).status == 400
        assert (await client.get("/api/planner?start=10&stop=0")).status == 400
    finally:
        await client.close()


# -- a real cluster, the console on it, and a browser ----------------------------------------------------


def _config() -> str:
    from qkd_sim.network import mesh_toml

    return mesh_toml("console", 2, SITES, client_site="desk")


def _data(rows: int) -> tuple[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    d = {"age": rng.integers(18, 95, rows), "sex": rng.choice(["M", "F"], rows),
         "weight": np.round(rng.normal(75, 12, rows), 1).clip(20, 250)}
    lines = ["age,sex,weight"] + [f"{a},{s},{w:.1f}" for a, s, w in zip(d["age"], d["sex"], d["weight"],
                                                                        strict=True)]
    return "\n".join(lines) + "\n", d


class ConsoleThread:
    """The console app on 127.0.0.1 (a free port), served by its own event loop in a thread."""

    def __init__(self, config: ConsoleConfig):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _start(self) -> int:
        self.runner = web.AppRunner(create_app(self.config), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    def __enter__(self) -> ConsoleThread:
        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    config = root / "console.toml"
    config.write_text(_config())
    state = root / "state"
    cluster.up(config, state)
    try:
        csv, data = _data(ROWS)

        async def setup():
            async with QStore(ClusterState.load(state), node_timeout_s=120) as qs:
                await qs.tables().put("patients", csv, SCHEMA)

        asyncio.run(setup())
        with ConsoleThread(ConsoleConfig(state=state)) as console:
            yield state, data, root, console
    finally:
        cluster.down(state)


def _artifacts(tmp_path_factory) -> Path:
    where = os.environ.get("QSTORE_TEST_ARTIFACTS")
    path = Path(where) / "console" if where else tmp_path_factory.mktemp("console-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        return f"no Chromium at {CHROMIUM} (Debian package 'chromium'; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; the dev extra has it)"
    return None


def test_the_console_end_to_end_in_chromium(world, tmp_path, tmp_path_factory):
    if reason := _browser_missing():
        pytest.skip(reason)
    from playwright.sync_api import expect, sync_playwright

    state, data, _, console = world
    gw = json.loads((state / "cluster.json").read_text())["gateway"]
    shots = _artifacts(tmp_path_factory)
    payload = np.random.default_rng(1).integers(0, 256, 3 * (1 << 20) + 12345, dtype=np.uint8).tobytes()
    upload = tmp_path / "scan 1.bin"
    upload.write_bytes(payload)
    started = time.perf_counter()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else
                                     shutil.which("chromium"), headless=True, args=["--no-sandbox"])
        try:
            ctx = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
            page = ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: d.accept())
            page.goto(console.url + "/")
            expect(page.locator("#page-login")).to_be_visible()
            page.fill("#access-key", gw["access_key"])
            page.fill("#secret-key", "wrong-secret-key-0000")
            page.click("#login-button")
            expect(page.locator("#login-error")).to_contain_text("wrong access key")
            page.fill("#secret-key", gw["secret_key"])
            page.click("#login-button")
            expect(page.locator("#who")).to_have_text("admin")
            cookies = {c["name"]: c for c in ctx.cookies()}
            assert cookies[SESSION_COOKIE]["httpOnly"] and cookies[SESSION_COOKIE]["sameSite"] == "Strict"
            assert page.evaluate("document.cookie").find(SESSION_COOKIE) < 0  # JS cannot read the session

            # Network: 4 sites, 6 links, live pool levels
            expect(page.locator("#net-map circle.site")).to_have_count(4)
            expect(page.locator("#net-map line.link")).to_have_count(6)
            expect(page.locator("#net-links tbody tr")).to_have_count(6)
            page.screenshot(path=str(shots / "network.png"), full_page=True)

            # Nodes: 4 KMEs, 3 nodes, the gateway, all healthy
            page.click("a[href='#/nodes']")
            expect(page.locator("#nodes-table tbody tr")).to_have_count(8)
            expect(page.locator("#nodes-table td.health-ok")).to_have_count(8)
            page.screenshot(path=str(shots / "nodes.png"), full_page=True)

            # Objects: a bucket, an upload with progress, listed, downloaded byte-exact, deleted
            page.click("a[href='#/objects']")
            page.fill("#new-bucket", "scans")
            page.click("#create-bucket")
            expect(page.locator("#bucket")).to_have_value("scans")
            page.set_input_files("#upload-file", str(upload))
            page.fill("#upload-key", "ward-3/scan 1.bin")
            page.click("#upload-button")
            row = page.locator("#objects-table tbody tr[data-key='ward-3/scan 1.bin']")
            expect(row).to_have_count(1, timeout=60_000)
            assert page.eval_on_selector("#upload-progress", "e => e.value") == 100
            page.screenshot(path=str(shots / "objects.png"), full_page=True)
            with page.expect_download() as info:
                row.locator("a.download").click()
            got = Path(info.value.path()).read_bytes()
            assert len(got) == len(payload) and got == payload
            assert info.value.suggested_filename == "scan 1.bin"

            # Statistics: mean weight, overall and by sex, against numpy
            page.click("a[href='#/stats']")
            expect(page.locator("#stats-table option")).to_have_count(1)
            page.select_option("#stats-op", "mean")
            page.check("#stats-columns input[value='weight']")
            page.click("#stats-run")
            cell = page.locator("#stats-result tbody td.value")
            expect(cell).to_have_count(1, timeout=60_000)
            assert float(cell.get_attribute("data-value")) == pytest.approx(data["weight"].mean(), rel=1e-9)
            page.check("#stats-groupby input[value='sex']")
            page.fill("#stats-where", "age >= 30")
            page.click("#stats-run")
            expect(page.locator("#stats-result tbody tr")).to_have_count(2, timeout=60_000)
            expect(page.locator("#stats-chart rect.bar")).to_have_count(2)
            older = data["age"] >= 30
            for r in page.locator("#stats-result tbody tr").all():
                sex = r.locator("td").first.inner_text().split("=")[1]
                want = data["weight"][older & (data["sex"] == sex)].mean()
                got_v = float(r.locator("td.value").get_attribute("data-value"))
                assert got_v == pytest.approx(want, rel=1e-9), sex
            page.screenshot(path=str(shots / "statistics.png"), full_page=True)
            # a group under min_group_size is shown as suppressed
            page.uncheck("#stats-groupby input[value='sex']")
            page.select_option("#stats-op", "count")
            page.uncheck("#stats-columns input[value='weight']")
            page.fill("#stats-where", "age > 93")
            page.click("#stats-run")
            expect(page.locator("#stats-result tbody td.value.suppressed")).to_have_count(1, timeout=60_000)
            page.screenshot(path=str(shots / "statistics-suppressed.png"), full_page=True)

            # Key-rate planner: the model's curve
            page.click("a[href='#/planner']")
            expect(page.locator("#plan-chart path.curve.rate")).to_have_count(1)
            assert len(page.locator("#plan-chart path.curve.rate").get_attribute("d")) > 50
            expect(page.locator("#plan-summary")).to_contain_text("decoy-bb84")
            page.screenshot(path=str(shots / "planner.png"), full_page=True)

            page.click("a[href='#/objects']")
            row = page.locator("#objects-table tbody tr[data-key='ward-3/scan 1.bin']")
            row.locator("button.delete").click()
            expect(row).to_have_count(0, timeout=30_000)

            page.click("#logout")
            expect(page.locator("#page-login")).to_be_visible()
            assert errors == []
        finally:
            browser.close()
    seconds = time.perf_counter() - started
    print(f"\nbrowser test: {seconds:.1f} s; screenshots in {shots}")
    assert sorted(p.name for p in shots.glob("*.png")) == sorted(
        ["network.png", "nodes.png", "objects.png", "statistics.png", "statistics-suppressed.png",
         "planner.png"])


MANY = 10_000


def _fill(state: Path, bucket: str, count: int) -> float:
    """``count`` small objects in ``bucket`` (put concurrently); the seconds it took."""
    async def go():
        async with QStore(ClusterState.load(state), node_timeout_s=120) as qs:
            await qs.create_bucket(bucket)
            sem = asyncio.Semaphore(256)

            async def one(i: int) -> None:
                async with sem:
                    await qs.put(bucket, f"obj/{i:05d}", f"object {i}\n".encode())

            await asyncio.gather(*(one(i) for i in range(count)))

    started = time.perf_counter()
    asyncio.run(go())
    return time.perf_counter() - started


def test_pages_load_in_under_a_second_with_10000_objects(world, tmp_path_factory):
    """The issue's target: console pages load in under 1 s on loopback with 10,000 stored objects."""
    state, _, _, console = world
    filled = _fill(state, "many", MANY)
    gw = json.loads((state / "cluster.json").read_text())["gateway"]

    async def api_pages() -> list[float]:
        async with TestClient(TestServer(create_app(ConsoleConfig(state=state)), host="127.0.0.1")) as c:
            await _login(c, s3users.User("admin", gw["access_key"], gw["secret_key"], frozenset({"*"})))
            times, after, keys = [], "", []
            for _ in range(3):  # first pages, then one from the middle and the last
                t0 = time.perf_counter()
                resp = await c.get("/api/objects", params={"bucket": "many", "after": after, "limit": "100"})
                times.append(time.perf_counter() - t0)
                page = await resp.json()
                keys += [o["key"] for o in page["objects"]]
                after = page["next"]
            assert keys == [f"obj/{i:05d}" for i in range(300)]
            for after, first in (("obj/04999", "obj/05000"), ("obj/09949", "obj/09950")):
                t0 = time.perf_counter()
                page = await (await c.get("/api/objects", params={"bucket": "many", "after": after})).json()
                times.append(time.perf_counter() - t0)
                assert page["objects"][0]["key"] == first
            assert page["next"] is None and len(page["objects"]) == 50
            return times

    api_times = asyncio.run(api_pages())
    assert max(api_times) < 1.0, api_times
    if reason := _browser_missing():
        pytest.skip(f"API pages took {max(api_times):.3f} s at most; browser part: {reason}")
    from playwright.sync_api import expect, sync_playwright

    shots = _artifacts(tmp_path_factory)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else
                                     shutil.which("chromium"), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(console.url + "/")
            page.fill("#access-key", gw["access_key"])
            page.fill("#secret-key", gw["secret_key"])
            page.click("#login-button")
            expect(page.locator("#who")).to_have_text("admin")
            loads = []
            for route in ("#/objects", "#/nodes", "#/network", "#/stats", "#/planner"):
                t0 = time.perf_counter()
                page.goto(console.url + "/" + route)
                if route == "#/objects":
                    page.select_option("#bucket", "many")
                    expect(page.locator("#objects-table tbody tr")).to_have_count(100)
                    expect(page.locator("#objects-table tbody tr").first).to_have_attribute("data-key",
                                                                                             "obj/00000")
                else:
                    name = {"#/nodes": "#nodes-table tbody tr", "#/network": "#net-map circle",
                            "#/stats": "#stats-columns input", "#/planner": "#plan-chart path.curve.rate"}
                    page.locator(name[route]).first.wait_for()
                loads.append((route, time.perf_counter() - t0))
            t0 = time.perf_counter()
            page.goto(console.url + "/#/objects")
            page.select_option("#bucket", "many")
            expect(page.locator("#objects-table tbody tr").first).to_have_attribute("data-key", "obj/00000")
            for n in range(1, 4):
                page.click("#next-page")
                expect(page.locator("#objects-table tbody tr").first).to_have_attribute("data-key",
                                                                                         f"obj/{100 * n:05d}")
            loads.append(("objects + 3 next pages", time.perf_counter() - t0))
            page.screenshot(path=str(shots / "objects-10000.png"), full_page=True)
        finally:
            browser.close()
    api_ms = ", ".join(f"{t * 1000:.0f}" for t in api_times)
    print(f"\n{MANY} objects put in {filled:.1f} s; API pages {api_ms} ms; browser: "
          + ", ".join(f"{r} {t * 1000:.0f} ms" for r, t in loads))
    assert all(t < 1.0 for r, t in loads if not r.startswith("objects +")), loads
    assert loads[-1][1] < 4.0, loads


def test_the_console_command_serves_and_refuses_without_users(tmp_path, creds):
    import socket
    import subprocess
    import sys
    import urllib.request

    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-m", "client.cli", "console", "--state", str(tmp_path / "none")],
                         cwd=root, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and res.stderr.startswith("qstore: ") and "no users may log in" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "console", "--state", str(tmp_path / "none"),
                             "--users", str(creds[0]), "--port", str(port)], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                    assert resp.status == 200 and b"qstore console" in resp.read()
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/login", method="POST",
                                     data=json.dumps({"access_key": creds[1].access_key,
                                                      "secret_key": creds[1].secret_key}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["user"] == "alice"
            assert "HttpOnly" in resp.headers["Set-Cookie"]
    finally:
        proc.terminate()
        proc.wait(10)
