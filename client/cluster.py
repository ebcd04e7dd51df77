"""The local cluster launcher: every KME and node of a cluster file as its own process on this machine.

`qstore cluster up` makes (or reuses) the development CA and the certificates,
draws fresh link seeds, picks ports, writes ``cluster.json``, starts every
process detached and waits until each answers its health check over mutual
TLS; `status` asks each process and each KME's link pools; `down` stops them.
The processes find everything through the state directory, so a cluster
outlives the command that started it.

State directory layout (all paths in ``cluster.json`` absolute)::

    ca/ca.pem, ca/ca.key          development CA (kept across runs)
    certs/<id>.pem, <id>.key      KMEs (kme.<site>), nodes (node.<site>), client, gateway (kept)
    logs/<id>.log                 stdout and stderr of each process (truncated at each up)
    nodes/<site>/                 node data (kept)
    secrets.json                  link and local seeds of this run (0600; new at each up, removed at down)
    gateway/credentials.json      the S3 gateway's users and keys (0600; new at each up)
    cluster.json                  :class:`qstore.cluster.ClusterState`, plus a "links" section
                                  (:class:`qkd_sim.deploy.LinkState`) and a "gateway" section
                                  (url, access_key, secret_key, pid, log, credentials; the file is
                                  0600 then); removed at down

With nodes, `up` also starts the S3 gateway (`qstore s3 serve`) on plain
HTTP at 127.0.0.1 (S3 clients take ``--endpoint-url http://...``; the
gateway is meant to run inside the site, beside its users), with a freshly
generated access key pair.

Seeds are drawn anew at every `up`: a KME hands its key streams out from
their start at every start, so a seed used by two runs would hand out the
same key twice. For the same reason a KME restarted alone in a running
cluster (`qstore kme serve` by hand) reuses its links' streams: restart the
whole cluster instead, unless no key was handed out yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qkd_sim import deploy, pki
from qkd_sim.kme import KMEConfig
from qkd_sim.network import Network
from qstore.cluster import (
    CLIENT_SAE,
    GATEWAY_SAE,
    SECRETS_FILE,
    STATE_FILE,
    ClusterState,
    ClusterStateError,
    KMEInfo,
    NodeInfo,
    SAEInfo,
    kme_id,
    node_sae_id,
)
from qstore.errors import LocalError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "deploy" / "local.toml"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 15
_RENEW_BEFORE = datetime.timedelta(days=1)


class ClusterStartError(LocalError):
    """A process of the cluster did not come up; everything started was stopped again."""


@dataclass(frozen=True)
class Layout:
    """Where each file of a cluster's state lives."""

    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def secrets(self) -> Path:
        return self.root / SECRETS_FILE

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    def node_data(self, site: str) -> Path:
        return self.root / "nodes" / site

    def log(self, proc_id: str) -> Path:
        return self.logs / f"{proc_id}.log"

    def cert(self, name: str) -> tuple[Path, Path]:
        return self.certs / f"{name}.pem", self.certs / f"{name}.key"


# -- secrets ------------------------------------------------------------------------------------


def write_secrets(path: Path, seeds: deploy.Seeds) -> None:
    """Write the seeds readable by their owner only, atomically."""
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, json.dumps(seeds.to_json()).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_secrets(path: Path) -> deploy.Seeds:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ClusterStateError(f"no {path.name} in {path.parent}: start the cluster with "
                                "`qstore cluster up`") from None
    except ValueError:
        raise ClusterStateError(f"{path}: unreadable secrets file") from None
    return deploy.Seeds.from_json(doc, str(path))


# -- certificates -------------------------------------------------------------------------------


def ensure_ca(layout: Layout) -> pki.CA:
    """The state directory's CA: the one already there, else a new one."""
    if (layout.ca_dir / "ca.pem").exists() and (layout.ca_dir / "ca.key").exists():
        return pki.load_ca(layout.ca_dir)
    return pki.create_ca(layout.ca_dir)


def _usable(ca: pki.CA, cert_path: Path, key_path: Path, hosts: Iterable[str]) -> bool:
    """Whether an existing certificate was issued by ``ca``, is valid a while longer and names ``hosts``."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca.cert)
        if not key_path.exists():
            return False
        now = datetime.datetime.now(datetime.UTC)
        if cert.not_valid_after_utc < now + _RENEW_BEFORE:
            return False
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = {str(v) for v in san.get_values_for_type(x509.IPAddress)}
        names |= set(san.get_values_for_type(x509.DNSName))
        return set(hosts) <= names
    except Exception:  # unreadable, another CA's, no SAN: issue a new one
        return False


def ensure_cert(ca: pki.CA, layout: Layout, name: str, kind: pki.Kind,
                hosts: Iterable[str]) -> tuple[Path, Path]:
    """``(cert, key)`` of ``name``: reused when still good for this CA and these hosts, else issued."""
    hosts = tuple(dict.fromkeys(hosts))
    cert, key = layout.cert(name)
    if _usable(ca, cert, key, hosts if kind != "sae" else ()):
        return cert, key
    ident = pki.issue(ca, name, layout.certs, kind=kind, hosts=hosts)
    return ident.cert, ident.key


def _hosts(host: str) -> tuple[str, ...]:
    return (host, "127.0.0.1", "localhost")


# -- processes ----------------------------------------------------------------------------------


def kme_command(config: Path, site: str, state: Path) -> list[str]:
    return [sys.executable, "-m", "client.cli", "kme", "serve", str(config),
            "--site", site, "--state", str(state)]


def node_command(site: str, state: Path) -> list[str]:
    return [sys.executable, "-m", "client.cli", "node", "serve", "--site", site, "--state", str(state)]


def gateway_command(state: Path, port: int, credentials: Path) -> list[str]:
    return [sys.executable, "-m", "client.cli", "s3", "serve", "--state", str(state), "--port", str(port),
            "--credentials", str(credentials)]


GATEWAY_ID = "gateway"


def gateway_of(state: ClusterState) -> dict[str, Any] | None:
    """The ``gateway`` section of ``cluster.json`` (None when no gateway was started)."""
    gw = state.extra.get("gateway")
    return gw if isinstance(gw, dict) and isinstance(gw.get("url"), str) else None


def plan_gateway(layout: Layout) -> dict[str, Any]:
    """A port, a fresh key pair (written 0600) and the ``gateway`` section for `up`."""
    from client.s3 import users as s3users

    (layout.root / "gateway").mkdir(parents=True, exist_ok=True)
    creds = layout.root / "gateway" / "credentials.json"
    user = s3users.new_user("admin")
    s3users.write(creds, [user])
    port = _free_ports(["127.0.0.1"])[0]
    return {"url": f"http://127.0.0.1:{port}", "access_key": user.access_key, "secret_key": user.secret_key,
            "credentials": str(creds), "log": str(layout.log(GATEWAY_ID)), "pid": None}


def node_command_missing() -> str | None:
    """Why this installation cannot run `qstore node serve`, or None when it can.

    The node service is built separately; until it imports, a cluster runs its KMEs only.
    """
    import argparse
    import importlib

    from client.cli import build_parser

    try:
        importlib.import_module("nodes.service")
    except ImportError as exc:
        return f"the node service does not import ({exc})"

    def sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return None

    node = sub(build_parser(), "node")
    if node is None or sub(node, "serve") is None:
        return "there is no `qstore node serve` command"
    return None


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def is_ours(pid: int | None, state: Path) -> bool:
    """Whether ``pid`` is alive and is a qstore process of this state directory (pids get reused).

    A zombie has an empty command line, so it counts as gone.
    """
    if not pid or pid <= 0:
        return False
    if not Path("/proc/self").exists():  # no procfs: trust the pid
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    args = _cmdline(pid) or []
    return "client.cli" in args and str(state) in args


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _spawn(cmd: list[str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,  # noqa: S603
                                cwd=cwd, env=env, start_new_session=True, close_fds=True)


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], state: Path, wait_s: float) -> list[int]:
    """Wait until none of ``pids`` is ours any more, at most ``wait_s``; those still there."""
    deadline = time.monotonic() + wait_s
    while True:
        for pid in pids:
            _reap(pid)
        left = [pid for pid in pids if is_ours(pid, state)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _stop(pids: Iterable[int], state: Path, timeout_s: float) -> list[int]:
    """SIGTERM each of our live ``pids``, SIGKILL those left after ``timeout_s``. Returns those signalled."""
    mine = [pid for pid in pids if is_ours(pid, state)]
    _signal(mine, signal.SIGTERM)
    left = _wait_gone(mine, state, timeout_s)
    if left:
        _signal(left, signal.SIGKILL)
        _wait_gone(left, state, 5.0)
    return mine


def _stop_children(procs: Iterable[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """Stop processes this one started (known to be ours: no command-line check, no pid reuse)."""
    procs = list(procs)
    for p in procs:
        with contextlib.suppress(OSError):
            p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None:
        return ""
    try:
        text = path.read_bytes()[-16384:].decode(errors="replace")
    except OSError:
        return f"(no log at {path})"
    shown = text.splitlines()[-lines:]
    return "\n".join("  | " + line for line in shown) if shown else "  (the log is empty)"


def _free_ports(hosts: list[str]) -> list[int]:
    """One free TCP port per host, all different (sockets held until all are picked)."""
    socks, ports = [], []
    try:
        for host in hosts:
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            socks.append(s)
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _url(host: str, port: int) -> str:
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def _port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


# -- the state of a run -------------------------------------------------------------------------


def links_of(state: ClusterState) -> list[deploy.LinkState]:
    raw = state.extra.get("links", [])
    if not isinstance(raw, list):
        raise ClusterStateError(f"{state.path}: links must be a list")
    return [deploy.LinkState.from_json(e, f"{state.path}: links[{i}]") for i, e in enumerate(raw)]


def plan(net: Network, config: Path, root: Path, *, nodes: bool, epoch: float) -> ClusterState:
    """Certificates, ports and the ``cluster.json`` of a new run (no pids yet); writes the certificates."""
    layout = Layout(root)
    ca = ensure_ca(layout)
    node_sites = net.node_sites if nodes else ()
    want = [(s.host, s.kme_port) for s in net.sites] + [(s.host, s.node_port) for s in node_sites]
    free = iter(_free_ports([host for host, port in want if not port]))
    ports = [port or next(free) for _, port in want]
    kme_ports = dict(zip([s.name for s in net.sites], ports[: len(net.sites)], strict=True))
    node_ports = dict(zip([s.name for s in node_sites], ports[len(net.sites):], strict=True))

    kmes = []
    for site in net.sites:
        ensure_cert(ca, layout, kme_id(site.name), "kme", _hosts(site.host))
        kmes.append(KMEInfo(id=kme_id(site.name), site=site.name, url=_url(site.host, kme_ports[site.name]),
                            log=layout.log(kme_id(site.name))))
    saes = []
    for sae, site_name in deploy.sae_sites(net).items():
        site = net.site(site_name)
        kind: pki.Kind = "node" if sae == node_sae_id(site_name) else "sae"
        cert, key = ensure_cert(ca, layout, sae, kind, _hosts(site.host) if kind == "node" else ())
        saes.append(SAEInfo(id=sae, site=site_name, kme=kme_id(site_name), cert=cert, key=key))
    xs = deploy.node_xs(net)
    node_infos = []
    for site in node_sites:
        data = layout.node_data(site.name)
        data.mkdir(parents=True, exist_ok=True)
        node_infos.append(NodeInfo(id=node_sae_id(site.name), site=site.name, x=xs[site.name],
                                   url=_url(site.host, node_ports[site.name]), data=data,
                                   log=layout.log(node_sae_id(site.name))))
    links = [lk.to_json() for lk in deploy.link_states(net, epoch)]
    return ClusterState(directory=root, name=net.name, k=net.k, n=net.n, ca=ca.cert_path, config=config,
                        kmes=tuple(kmes), nodes=tuple(node_infos), saes=tuple(saes),
                        extra={"links": links, "started_at": epoch})


def _clear(layout: Layout) -> None:
    for path in (layout.state, layout.secrets):
        path.unlink(missing_ok=True)


def _pids(state: ClusterState) -> list[int]:
    gw = gateway_of(state)
    return [p.pid for p in (*state.kmes, *state.nodes) if p.pid] + ([gw["pid"]] if gw and gw["pid"] else [])


def _live(state: ClusterState) -> list[str]:
    gw = gateway_of(state)
    out = [p.id for p in (*state.kmes, *state.nodes) if is_ours(p.pid, state.directory)]
    return out + ([GATEWAY_ID] if gw and is_ours(gw.get("pid"), state.directory) else [])


def _existing(root: Path) -> ClusterState | None:
    try:
        return ClusterState.load(root)
    except ClusterStateError as exc:
        if (root / STATE_FILE).exists():
            raise ClusterStateError(f"{exc}: if no cluster runs there, remove the file") from None
        return None


# -- health -------------------------------------------------------------------------------------


@dataclass
class Probe:
    """One health answer: ``ok`` when the process answered 200 as the one expected."""

    ok: bool
    detail: str
    body: dict[str, Any] = field(default_factory=dict)


def _client_ssl(state: ClusterState) -> Any:
    client = state.sae(CLIENT_SAE)
    return pki.client_ssl_context(client.cert, client.key, state.ca)


async def _probe(session: Any, url: str, expect: tuple[str, str]) -> Probe:
    import aiohttp

    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S), session.get(url) as resp:
            body = await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Probe(False, f"no answer ({type(exc).__name__})")
    if resp.status != 200:
        return Probe(False, f"HTTP {resp.status}")
    try:
        doc = json.loads(body)
    except ValueError:
        return Probe(False, "answer is not JSON")
    if not isinstance(doc, dict):
        return Probe(False, "answer is not a JSON object")
    name, value = expect
    if name in doc and doc[name] != value:
        return Probe(False, f"answered as {doc[name]!r}, not {value!r}")
    return Probe(True, "ok", doc)


def _health_targets(state: ClusterState) -> list[tuple[str, str, str, tuple[str, str]]]:
    """(kind, id, health URL, (field, expected value)) of every process."""
    out = [("kme", k.id, k.url + "/health", ("KME_ID", k.id)) for k in state.kmes]
    out += [("node", n.id, n.url + "/v1/health", ("sae_id", n.id)) for n in state.nodes]
    gw = gateway_of(state)
    if gw is not None:
        out.append(("gateway", GATEWAY_ID, gw["url"] + "/-/health", ("sae_id", GATEWAY_SAE)))
    return out


async def _wait_healthy(state: ClusterState, procs: dict[str, subprocess.Popen[bytes]],
                        deadline: float, timeout_s: float) -> None:
    """Until every process in ``procs`` answers its health check; fails at its first exit or at ``deadline``
    (``timeout_s`` after `up` began)."""
    import aiohttp

    logs = {p.id: p.log for p in (*state.kmes, *state.nodes)}
    if (gw := gateway_of(state)) is not None:
        logs[GATEWAY_ID] = Path(gw["log"])
    pending = {pid: (kind, url, expect) for kind, pid, url, expect in _health_targets(state) if pid in procs}
    last: dict[str, str] = {}
    connector = aiohttp.TCPConnector(ssl=_client_ssl(state), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        while pending:
            for proc_id in list(pending):
                code = procs[proc_id].poll()
                if code is not None:
                    kind = pending[proc_id][0]
                    raise ClusterStartError(f"{kind} {proc_id} exited with status {code} while starting; "
                                            f"last lines of {logs[proc_id]}:\n{_tail(logs[proc_id])}")
            answers = await asyncio.gather(*(_probe(session, url, expect)
                                             for url, expect in ((v[1], v[2]) for v in pending.values())))
            for proc_id, probe in zip(list(pending), answers, strict=True):
                if probe.ok:
                    del pending[proc_id]
                else:
                    last[proc_id] = probe.detail
            if not pending:
                return
            if time.monotonic() > deadline:
                proc_id = next(iter(pending))
                kind = pending[proc_id][0]
                others = f" (and {len(pending) - 1} more)" if len(pending) > 1 else ""
                raise ClusterStartError(
                    f"{kind} {proc_id}{others} not healthy after {timeout_s:g} s ({last.get(proc_id, '?')}); "
                    f"last lines of {logs[proc_id]}:\n{_tail(logs[proc_id])}")
            await asyncio.sleep(0.1)


# -- the commands -------------------------------------------------------------------------------


def up(config: Path | None, root: Path, *, nodes: bool | None = None, gateway: bool = True,
       timeout_s: float = START_TIMEOUT_S) -> ClusterState:
    """Start the cluster of ``config`` with its state in ``root``; return its state once all are healthy.

    ``nodes`` None: start nodes when `qstore node serve` exists; the S3
    gateway starts with the nodes unless ``gateway`` is False. Refuses when a
    cluster of ``root`` still runs; clears a dead one's state first.
    """
    config = (config or DEFAULT_CONFIG).absolute()
    net = Network.from_toml(config)
    layout = Layout(root)
    old = _existing(root)
    if old is not None:
        live = _live(old)
        if live:
            raise LocalError(f"a cluster is already running in {root} ({len(live)} processes): "
                             "`qstore cluster down` first")
        _clear(layout)
    if nodes is None:
        missing = node_command_missing()
        if missing is not None:
            log.warning("starting the KMEs only: %s", missing)
        nodes = missing is None
    root.mkdir(parents=True, exist_ok=True)
    state = plan(net, config, root, nodes=nodes, epoch=time.time())
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        write_secrets(layout.secrets, deploy.Seeds.new(net))
        state.save()
        # KMEs first: a node may ask its KME for keys as soon as it runs
        deadline = time.monotonic() + timeout_s
        for phase in ("kmes", "nodes"):
            members = getattr(state, phase)
            for m in members:
                cmd = kme_command(config, m.site, root) if phase == "kmes" else node_command(m.site, root)
                procs[m.id] = _spawn(cmd, layout.log(m.id), root)
            state = replace(state, **{phase: tuple(replace(m, pid=procs[m.id].pid) for m in members)})
            if phase == "nodes" and nodes and gateway:  # beside the nodes: it needs them only per request
                gw = plan_gateway(layout)
                cmd = gateway_command(root, _port_of(gw["url"]), Path(gw["credentials"]))
                procs[GATEWAY_ID] = _spawn(cmd, layout.log(GATEWAY_ID), root)
                gw["pid"] = procs[GATEWAY_ID].pid
                state = replace(state, extra={**state.extra, "gateway": gw})
            state.save()
            asyncio.run(_wait_healthy(state, procs, deadline, timeout_s))
    except BaseException:
        _stop_children(procs.values(), timeout_s=3.0)
        _clear(layout)
        raise
    for p in procs.values():
        p.returncode = 0  # detached on purpose: keeps Popen from warning that they still run
    return state


@dataclass(frozen=True)
class Stopped:
    state_dir: Path
    stopped: tuple[str, ...]  # IDs of the processes that were running and were stopped
    was_running: bool  # whether there was a cluster state at all


def down(root: Path, *, timeout_s: float = STOP_TIMEOUT_S) -> Stopped:
    """Stop every process of the cluster in ``root``; keep the CA, certificates, logs and node data."""
    layout = Layout(root)
    state = _existing(root)
    if state is None:
        layout.secrets.unlink(missing_ok=True)
        return Stopped(root, (), False)
    by_pid = {p.pid: p.id for p in (*state.kmes, *state.nodes) if p.pid}
    if (gw := gateway_of(state)) is not None and gw.get("pid"):
        by_pid[gw["pid"]] = GATEWAY_ID
    stopped = _stop(_pids(state), root, timeout_s)
    _clear(layout)
    return Stopped(root, tuple(by_pid[pid] for pid in stopped), True)


async def _status(state: ClusterState) -> dict[str, Any]:
    import aiohttp

    processes = []
    for kind, proc_id, url, expect in _health_targets(state):
        if kind == "gateway":
            gw = gateway_of(state) or {}
            site, pid, purl = state.sae(GATEWAY_SAE).site, gw.get("pid"), gw.get("url", "")
        else:
            info = state.kme(proc_id) if kind == "kme" else state.node(proc_id)
            site, pid, purl = info.site, info.pid, info.url
        processes.append({"kind": kind, "id": proc_id, "site": site, "pid": pid,
                          "alive": is_ours(pid, state.directory), "url": purl,
                          "health": None, "_probe": (url, expect)})
    links = links_of(state)
    connector = aiohttp.TCPConnector(ssl=_client_ssl(state), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        probes = await asyncio.gather(*(_probe(session, *p["_probe"]) for p in processes))
        pools = await asyncio.gather(*(_probe(session, k.url + "/kme/v1/links", ("KME_ID", k.id))
                                       for k in state.kmes))
    for proc, probe in zip(processes, probes, strict=True):
        del proc["_probe"]
        proc["health"] = probe.detail  # asked even when the recorded pid is gone: one may run by hand
    figures: dict[tuple[str, str], dict[str, Any]] = {}
    for k, probe in zip(state.kmes, pools, strict=True):
        for entry in probe.body.get("links", []) if probe.ok else []:
            figures[(k.id, entry.get("peer_KME_ID"))] = entry
    out_links = []
    for lk in links:
        row: dict[str, Any] = {"a": lk.a, "b": lk.b, "rate_bps": lk.rate_bps,
                               "capacity_bits": lk.capacity_bits}
        for src, dst in ((lk.a, lk.b), (lk.b, lk.a)):
            got = figures.get((kme_id(src), kme_id(dst)))
            row[f"{src}->{dst}"] = None if got is None else {
                name: got.get(name) for name in ("available_bits", "delivered_bits")}
        out_links.append(row)
    return {"state": str(state.directory), "name": state.name, "k": state.k, "n": state.n,
            "processes": processes, "links": out_links}


def status(root: Path) -> dict[str, Any]:
    """Each process (alive? healthy?) and each link's pools in both directions, as the KMEs report them."""
    return asyncio.run(_status(ClusterState.load(root)))


def healthy(report: dict[str, Any]) -> bool:
    return all(p["alive"] and p["health"] == "ok" for p in report["processes"])


# -- one KME ------------------------------------------------------------------------------------


def kme_config_for(config: Path | None, site: str, root: Path, *, port: int | None = None) -> KMEConfig:
    """The config of ``site``'s KME in the running cluster of ``root`` (as `qstore kme serve` runs it).

    Port: ``port``, else the one ``cluster.json`` gives its URL, else the site's ``kme_port``.
    """
    state = ClusterState.load(root)
    config = config or state.config
    if config is None:
        raise ClusterStateError(f"{state.path} names no cluster file: give one")
    net = Network.from_toml(config)
    layout = Layout(root)
    me = kme_id(net.site(site).name)
    try:
        url: str | None = state.kme(me).url
    except ClusterStateError:
        url = None
    if port is None:
        port = _port_of(url) if url else net.site(site).kme_port
    cert, key = layout.cert(me)
    return deploy.kme_config(net, site, links=links_of(state), seeds=read_secrets(layout.secrets),
                             kme_urls={k.id: k.url for k in state.kmes}, cert=cert, key=key, ca=state.ca,
                             port=port)


def serve_kme(config: KMEConfig) -> None:
    """Run one KME until SIGTERM or SIGINT (aiohttp's run_app turns both into a clean exit)."""
    from qkd_sim import kme

    kme.serve(config)


def rate_text(bps: float | None) -> str:
    if bps is None or math.isinf(bps):
        return "unlimited"
    for unit, scale in (("Gb/s", 1e9), ("Mb/s", 1e6), ("kb/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.2f} {unit}"
    return f"{bps:.0f} b/s"


def bits_text(bits: float | None) -> str:
    if bits is None:
        return "?"
    value = bits / 8
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def summary(state: ClusterState) -> Iterator[tuple[str, str, str]]:
    """(site, KME URL, node URL or '-') per site, in the order of the cluster file."""
    nodes = {n.site: n.url for n in state.nodes}
    for k in state.kmes:
        yield k.site, k.url, nodes.get(k.site, "-")

