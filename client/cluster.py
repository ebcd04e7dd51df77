"""The local cluster launcher: every KME and node of a cluster file as its own process on this machine.

`qstore cluster up` makes (or reuses) the development CA and the certificates,
draws fresh link seeds, picks ports, writes ``cluster.json``, starts every
process detached and waits until each answers its health check over mutual
TLS; `status` asks each process and each KME's link pools; `down` stops them.
The processes find everything through the state directory, so a cluster
outlives the command that started it.

State directory layout (all paths in ``cluster.json`` absolute)::

    ca/ca.pem, ca/ca.key          the cluster CA (kept across runs; ca.key only where certificates
                                  are issued)
    ca/issued.json                what the CA issued (`qstore ca list`)
    certs/<id>.pem, <id>.key      KMEs (kme.<site>), nodes (node.<site>), client, gateway (kept)
    logs/<id>.log                 stdout and stderr of each process (truncated at each up)
    nodes/<site>/                 node data (kept)
    secrets.json                  link and local seeds of this run (0600; new at each up, removed at down;
                                  across hosts: from `qstore cluster secrets`, with the links' epoch)
    spent-seeds.json              across hosts: which sites' KMEs ran with which secrets (hashes)
    gateway/credentials.json      the S3 gateway's users and keys (0600; new at each up)
    cluster.json                  :class:`qstore.cluster.ClusterState`, plus a "links" section
                                  (:class:`qkd_sim.deploy.LinkState`) and a "gateway" section
                                  (url, metrics_url, access_key, secret_key, pid, log, credentials; the
                                  file is 0600 then); removed at down

With nodes, `up` also starts the S3 gateway (`qstore s3 serve`) on plain
HTTP at 127.0.0.1 (S3 clients take ``--endpoint-url http://...``; the
gateway is meant to run inside the site, beside its users), with a freshly
generated access key pair.

Across hosts (`up --only SITE`, :func:`up_site`): each host starts its own
site's processes with the fixed ports of the cluster file, from a state
directory holding the CA certificate (``ca/ca.pem``; ``ca.key`` only where
certificates are issued: `qstore ca init|issue`, :func:`ca_init`,
:func:`ca_issue`), the site's certificates, and the same ``secrets.json`` as
every other host (`qstore cluster secrets`, :func:`new_secrets`: the link
seeds and the common epoch, drawn once and copied). Its ``cluster.json``
lists every process of the cluster, the other hosts' with pid null; several
`up --only` may share one state directory (a file lock orders their writes).
A KME must never start twice with the same seeds (it would hand out the same
key again), so ``spent-seeds.json`` records which sites' KMEs have used which
secrets, and `up --only` refuses a second start: draw new secrets, copy them,
restart every site.

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
import errno
import fcntl
import hashlib
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
from qkd_sim.network import Network, Site
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
DEFAULT_GATEWAY_PORT = 9000  # of `up --only`: every host must know where the gateway listens
SPENT_FILE = "spent-seeds.json"
CA_INDEX = "issued.json"
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

    @property
    def spent(self) -> Path:
        return self.root / SPENT_FILE

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def node_data(self, site: str) -> Path:
        return self.root / "nodes" / site

    def log(self, proc_id: str) -> Path:
        return self.logs / f"{proc_id}.log"

    def cert(self, name: str) -> tuple[Path, Path]:
        return self.certs / f"{name}.pem", self.certs / f"{name}.key"


# -- secrets ------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_secrets(path: Path, seeds: deploy.Seeds, *, shared: dict[str, Any] | None = None) -> None:
    """Write the seeds readable by their owner only, atomically.

    ``shared``: the ``cluster`` name and ``epoch`` of secrets drawn once for
    a cluster across hosts (`qstore cluster secrets`), kept beside the seeds.
    """
    doc = seeds.to_json()
    if shared is not None:
        doc["shared"] = shared
    _write_atomic(path, json.dumps(doc).encode(), 0o600)


def read_secrets(path: Path) -> deploy.Seeds:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ClusterStateError(f"no {path.name} in {path.parent}: start the cluster with "
                                "`qstore cluster up`") from None
    except ValueError:
        raise ClusterStateError(f"{path}: unreadable secrets file") from None
    return deploy.Seeds.from_json(doc, str(path))


@dataclass(frozen=True)
class SharedSecrets:
    """The secrets every host of a cluster uses: seeds, the links' common epoch, and a fingerprint."""

    seeds: deploy.Seeds
    epoch: float
    fingerprint: str  # names these seeds in spent-seeds.json (a hash: says nothing about them)


def _fingerprint(seeds: deploy.Seeds) -> str:
    return hashlib.sha256(json.dumps(seeds.to_json(), sort_keys=True).encode()).hexdigest()[:32]


def read_shared_secrets(path: Path, net: Network) -> SharedSecrets:
    """The secrets of `qstore cluster secrets` for ``net``; a clear error for any other file."""
    copy_hint = (f"create them once with `qstore cluster secrets CONFIG` and copy {SECRETS_FILE} "
                 "to every host's state directory")
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ClusterStateError(f"no {path.name} in {path.parent}: {copy_hint}") from None
    except ValueError:
        raise ClusterStateError(f"{path}: unreadable secrets file") from None
    seeds = deploy.Seeds.from_json(doc, str(path))
    shared = doc.get("shared") if isinstance(doc, dict) else None
    if not isinstance(shared, dict) or not isinstance(shared.get("epoch"), int | float):
        raise ClusterStateError(f"{path} was drawn by a single-host `qstore cluster up`: {copy_hint}")
    if shared.get("cluster") != net.name:
        raise ClusterStateError(f"{path} is cluster {shared.get('cluster')!r}'s, not {net.name!r}'s")
    for link in net.links:
        seeds.link(link.a, link.b)
    if missing := [s.name for s in net.sites if s.name not in seeds.local]:
        raise ClusterStateError(f"{path} has no seed for site {missing[0]}: the secrets are another "
                                "cluster file's")
    return SharedSecrets(seeds, float(shared["epoch"]), _fingerprint(seeds))


def new_secrets(config: Path | None, root: Path, *, force: bool = False) -> dict[str, Any]:
    """Draw the secrets of a cluster across hosts into ``root/secrets.json`` (once; copied to every host).

    Refuses to replace an existing file unless ``force``: hosts may be using it.
    """
    config = (config or DEFAULT_CONFIG).absolute()
    net = Network.from_toml(config)
    path = Layout(root).secrets
    if path.exists() and not force:
        raise LocalError(f"{path} exists (hosts may use it): --force draws new secrets, which every "
                         "site then needs (copy it, restart every site)")
    root.mkdir(parents=True, exist_ok=True)
    epoch = time.time()
    seeds = deploy.Seeds.new(net)
    write_secrets(path, seeds, shared={"cluster": net.name, "epoch": epoch})
    return {"secrets": str(path), "cluster": net.name, "epoch": epoch, "links": len(net.links),
            "sites": len(net.sites), "fingerprint": _fingerprint(seeds)}


def _shared_unused(path: Path) -> bool:
    """Whether ``path`` holds shared secrets (of `qstore cluster secrets`) that no run has started from yet:
    copied to this host for a coming `up --only`, so `down` keeps them."""
    try:
        return isinstance(json.loads(path.read_bytes()).get("shared"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _spent(layout: Layout) -> dict[str, list[str]]:
    try:
        doc = json.loads(layout.spent.read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError:
        raise ClusterStateError(f"{layout.spent}: unreadable; it says which sites' KMEs used which "
                                "secrets, so check it before removing it") from None
    return doc if isinstance(doc, dict) else {}


def _mark_spent(layout: Layout, fingerprint: str, site: str) -> None:
    """Record that ``site``'s KME has run with these seeds (call with the state directory locked)."""
    doc = _spent(layout)
    sites = doc.setdefault(fingerprint, [])
    if site not in sites:
        sites.append(site)
    _write_atomic(layout.spent, json.dumps(doc, indent=1).encode(), 0o644)


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    """Hold the state directory's lock: `up --only` of several sites may share one state directory."""
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Authority:
    """The cluster CA as a host holds it: its certificate, and its key only where certificates are issued."""

    cert: Any  # x509.Certificate
    cert_path: Path
    issuer: pki.CA | None  # None: no ca.key here (a site's host): certificates come from `qstore ca issue`


def load_authority(layout: Layout, *, create: bool) -> Authority:
    """The state directory's CA: certificate and key, the certificate alone, or (``create``) a new CA."""
    from cryptography import x509

    pem, key = layout.ca_dir / "ca.pem", layout.ca_dir / "ca.key"
    if pem.exists() and key.exists():
        ca = pki.load_ca(layout.ca_dir)
        return Authority(ca.cert, ca.cert_path, ca)
    if pem.exists():
        try:
            return Authority(x509.load_pem_x509_certificate(pem.read_bytes()), pem, None)
        except ValueError:
            raise LocalError(f"{pem}: not a PEM certificate") from None
    if key.exists():
        raise LocalError(f"{key} has no ca.pem beside it: restore it, or `qstore ca init --force` (new CA)")
    if not create:
        raise LocalError(f"no CA in {layout.ca_dir}: create one with `qstore ca init`, or copy ca/ca.pem "
                         "from the CA's host")
    ca = pki.create_ca(layout.ca_dir)
    return Authority(ca.cert, ca.cert_path, ca)


def cert_facts(cert: Any) -> dict[str, Any]:
    """Subject, kind (kme, node, sae), host names, serial and expiry of a certificate of this CA."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    hosts = [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)
    try:
        serves = ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(
            x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        serves = False
    if any(u.startswith(pki.KME_URN) for u in uris):
        kind = "kme"
    elif any(u.startswith(pki.SAE_URN) for u in uris):
        kind = "node" if serves else "sae"
    else:
        kind = "ca" if cert.issuer == cert.subject else "?"
    return {"subject": str(cns[0].value) if cns else cert.subject.rfc4514_string(), "kind": kind,
            "hosts": hosts, "serial": f"{cert.serial_number:x}",
            "not_after": cert.not_valid_after_utc.isoformat(timespec="seconds")}


def _problem(auth: Authority, cert_path: Path, key_path: Path, kind: str, hosts: Iterable[str]) -> str | None:
    """Why a certificate on disk cannot serve as ``kind`` for ``hosts`` under this CA; None when it can."""
    from cryptography import x509

    if not cert_path.exists():
        return "there is none"
    if not key_path.exists():
        return f"its key {key_path.name} is missing"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(auth.cert)
    except Exception:  # every failure means the same: issue a new one
        return "it is unreadable or another CA's"
    facts = cert_facts(cert)
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC) + _RENEW_BEFORE:
        return f"it expires {facts['not_after']}"
    if facts["kind"] != kind:
        return f"it is a {facts['kind']} certificate, not a {kind} one"
    if missing := [h for h in hosts if h not in facts["hosts"]]:
        return f"it does not name host {missing[0]}"
    return None


def _usable(auth: Authority, cert_path: Path, key_path: Path, hosts: Iterable[str], kind: str) -> bool:
    return _problem(auth, cert_path, key_path, kind, hosts) is None


def _record_issued(ca_dir: Path, cert_path: Path) -> None:
    """Add a certificate to the CA's list of what it issued (``ca/issued.json``, for `qstore ca list`)."""
    from cryptography import x509

    index = ca_dir / CA_INDEX
    entries = _issued(ca_dir)
    facts = cert_facts(x509.load_pem_x509_certificate(cert_path.read_bytes()))
    entries = [e for e in entries if e.get("serial") != facts["serial"]]
    entries.append({**facts, "file": str(cert_path.absolute())})
    _write_atomic(index, json.dumps(entries, indent=1).encode(), 0o644)


def _issued(ca_dir: Path) -> list[dict[str, Any]]:
    try:
        doc = json.loads((ca_dir / CA_INDEX).read_bytes())
    except FileNotFoundError:
        return []
    except ValueError:
        raise LocalError(f"{ca_dir / CA_INDEX}: unreadable list of issued certificates") from None
    return [e for e in doc if isinstance(e, dict)] if isinstance(doc, list) else []


def ensure_cert(auth: Authority, layout: Layout, name: str, kind: pki.Kind,
                hosts: Iterable[str]) -> tuple[Path, Path]:
    """``(cert, key)`` of ``name``: reused when good for this CA, its kind and ``hosts``, else issued.

    Issued certificates name 127.0.0.1 and localhost besides ``hosts``. Where
    the CA's key is not (a site's host), a missing or unusable certificate is
    an error that says which `qstore ca issue` command makes it.
    """
    hosts = tuple(dict.fromkeys(hosts)) if kind != "sae" else ()
    cert, key = layout.cert(name)
    why = _problem(auth, cert, key, kind, hosts)
    if why is None:
        return cert, key
    if auth.issuer is None:
        flags = f" --kind {kind}" + "".join(f" --host {h}" for h in hosts)
        raise LocalError(f"no usable certificate {cert} ({why}) and no CA key here to issue one: on the CA's "
                         f"host run `qstore ca issue {name}{flags}` and copy {name}.pem and {name}.key "
                         f"into {layout.certs}")
    ident = pki.issue(auth.issuer, name, layout.certs, kind=kind,
                      hosts=tuple(dict.fromkeys((*hosts, "127.0.0.1", "localhost"))))
    _record_issued(layout.ca_dir, ident.cert)
    return ident.cert, ident.key


# -- the CA, offline (`qstore ca`) ----------------------------------------------------------------


def ca_init(root: Path, *, force: bool = False, name: str = "qstore-dev-ca",
            days: int = 3650) -> dict[str, Any]:
    """Create the cluster CA in ``root/ca`` (refused where one exists, unless ``force``)."""
    layout = Layout(root)
    there = [p for p in (layout.ca_dir / "ca.pem", layout.ca_dir / "ca.key") if p.exists()]
    if there and not force:
        raise LocalError(f"a CA exists in {layout.ca_dir} (every certificate it issued depends on it): "
                         "--force replaces it")
    if not 1 <= days <= 36500:
        raise LocalError("--days must be 1 to 36500")
    (layout.ca_dir / CA_INDEX).unlink(missing_ok=True)
    ca = pki.create_ca(layout.ca_dir, name=name, days=days)
    return {**cert_facts(ca.cert), "cert": str(ca.cert_path), "key": str(ca.key_path)}


def ca_issue(root: Path, name: str, *, kind: str | None = None, hosts: Iterable[str] = (),
             out: Path | None = None, force: bool = False, days: int = 825) -> dict[str, Any]:
    """Issue a certificate and key (mode 0600) for ``name`` into ``out`` (default ``root/certs``).

    ``kind`` defaults from the ID: ``kme.*`` a KME, ``node.*`` a storage
    node, anything else an SAE (a client). KME and node certificates name
    the ``hosts`` they serve on; SAE certificates name none.
    """
    layout = Layout(root)
    auth = load_authority(layout, create=False)
    if auth.issuer is None:
        raise LocalError(f"no CA key in {layout.ca_dir}: issue certificates on the CA's host")
    kind = kind or ("kme" if name.startswith("kme.") else "node" if name.startswith("node.") else "sae")
    if kind not in ("sae", "node", "kme"):
        raise LocalError("--kind must be sae, node or kme")
    hosts = tuple(dict.fromkeys(hosts))
    if kind != "sae" and not hosts:
        raise LocalError(f"a {kind} certificate names the hosts it serves on: give --host")
    if kind == "sae" and hosts:
        raise LocalError("an sae certificate names no hosts: drop --host (or give --kind node)")
    if not 1 <= days <= 3650:
        raise LocalError("--days must be 1 to 3650")
    out = (out or layout.certs).absolute()
    for path in (out / f"{name}.pem", out / f"{name}.key"):
        if path.exists() and not force:
            raise LocalError(f"{path} exists: --force replaces it")
    ident = pki.issue(auth.issuer, name, out, kind=kind, hosts=hosts, days=days)  # type: ignore[arg-type]
    _record_issued(layout.ca_dir, ident.cert)
    from cryptography import x509

    facts = cert_facts(x509.load_pem_x509_certificate(ident.cert.read_bytes()))
    return {**facts, "cert": str(ident.cert), "key": str(ident.key), "ca": str(ident.ca)}


def ca_list(root: Path) -> dict[str, Any]:
    """The CA and what it issued: its own list, plus certificates of it found in ``root/certs``."""
    from cryptography import x509

    layout = Layout(root)
    auth = load_authority(layout, create=False)
    entries = {e.get("serial"): e for e in _issued(layout.ca_dir)}
    for path in sorted(layout.certs.glob("*.pem")) if layout.certs.is_dir() else ():
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            cert.verify_directly_issued_by(auth.cert)
        except Exception:  # not this CA's: not listed  # noqa: S112
            continue
        facts = cert_facts(cert)
        entries.setdefault(facts["serial"], {**facts, "file": str(path)})
    now = datetime.datetime.now(datetime.UTC)
    issued = sorted(entries.values(), key=lambda e: (str(e.get("subject")), str(e.get("not_after"))))
    for e in issued:
        e["expired"] = datetime.datetime.fromisoformat(str(e["not_after"])) < now
    return {"ca": {**cert_facts(auth.cert), "cert": str(auth.cert_path), "has_key": auth.issuer is not None},
            "issued": issued}


# -- processes ----------------------------------------------------------------------------------


def kme_command(config: Path, site: str, state: Path) -> list[str]:
    return [sys.executable, "-m", "client.cli", "kme", "serve", str(config),
            "--site", site, "--state", str(state)]


def node_command(site: str, state: Path) -> list[str]:
    return [sys.executable, "-m", "client.cli", "node", "serve", "--site", site, "--state", str(state)]


def gateway_command(state: Path, port: int, credentials: Path, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "client.cli", "s3", "serve", "--state", str(state), "--port", str(port),
            "--credentials", str(credentials), "--host", host]


GATEWAY_ID = "gateway"


def gateway_of(state: ClusterState) -> dict[str, Any] | None:
    """The ``gateway`` section of ``cluster.json`` (None when no gateway was started)."""
    gw = state.extra.get("gateway")
    return gw if isinstance(gw, dict) and isinstance(gw.get("url"), str) else None


def _http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def plan_gateway(layout: Layout, host: str = "127.0.0.1", port: int = 0) -> dict[str, Any]:
    """A port (``port``, else a free one), a new key pair (written 0600), the ``gateway`` section of `up`."""
    from client.s3 import users as s3users

    (layout.root / "gateway").mkdir(parents=True, exist_ok=True)
    creds = layout.root / "gateway" / "credentials.json"
    user = s3users.new_user("admin")
    s3users.write(creds, [user])
    url = _http_url(host, port or _free_ports([host])[0])
    return {"url": url, "access_key": user.access_key, "secret_key": user.secret_key,
            "credentials": str(creds), "log": str(layout.log(GATEWAY_ID)), "pid": None,
            "metrics_url": url + "/-/metrics"}


def remote_gateway(host: str, port: int) -> dict[str, Any]:
    """The ``gateway`` section for a gateway that another host runs (its keys stay there)."""
    url = _http_url(host, port)
    return {"url": url, "pid": None, "metrics_url": url + "/-/metrics"}


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


def check_fixed_ports(net: Network, source: Path | str, *, nodes: bool) -> None:
    """Across hosts every process's address must be known in advance: no port 0 in the cluster file."""
    for site in net.sites:
        keys = ("kme_port", "node_port") if nodes and site.node else ("kme_port",)
        for key in keys:
            if not getattr(site, key):
                raise LocalError(f"{source}: site {site.name} has no {key} (0 picks a free port, which other "
                                 "hosts cannot know): --only needs fixed ports for every site")


def plan(net: Network, config: Path, root: Path, *, nodes: bool, epoch: float, only: str | None = None,
         authority: Authority | None = None) -> ClusterState:
    """Certificates, ports and the ``cluster.json`` of a new run (no pids yet); writes the certificates.

    ``only``: a site of a cluster across hosts. Only its certificates are
    checked (and issued, where the CA's key is), ports are the cluster file's
    (:func:`check_fixed_ports` first), and the other sites' processes are
    listed with their URLs, no log and no data directory.
    """
    layout = Layout(root)
    auth = authority or load_authority(layout, create=True)
    node_sites = net.node_sites if nodes else ()
    want = [(s.host, s.kme_port) for s in net.sites] + [(s.host, s.node_port) for s in node_sites]
    free = iter(_free_ports([host for host, port in want if not port]))
    ports = [port or next(free) for _, port in want]
    kme_ports = dict(zip([s.name for s in net.sites], ports[: len(net.sites)], strict=True))
    node_ports = dict(zip([s.name for s in node_sites], ports[len(net.sites):], strict=True))

    def here(site: str) -> bool:
        return only is None or site == only

    kmes = []
    for site in net.sites:
        me, url = kme_id(site.name), _url(site.host, kme_ports[site.name])
        if here(site.name):
            ensure_cert(auth, layout, me, "kme", (site.host,))
        kmes.append(KMEInfo(id=me, site=site.name, url=url, log=layout.log(me) if here(site.name) else None,
                            metrics_url=url + "/metrics"))
    saes = []
    for sae, site_name in deploy.sae_sites(net).items():
        site = net.site(site_name)
        kind: pki.Kind = "node" if sae == node_sae_id(site_name) else "sae"
        cert, key = layout.cert(sae)
        # where the CA's key is not, a site needs its node's certificate; users' come when they need them
        if here(site_name) and (auth.issuer is not None or (kind == "node" and nodes)):
            cert, key = ensure_cert(auth, layout, sae, kind, (site.host,))
        saes.append(SAEInfo(id=sae, site=site_name, kme=kme_id(site_name), cert=cert, key=key))
    xs = deploy.node_xs(net)
    node_infos = []
    for site in node_sites:
        data = layout.node_data(site.name) if here(site.name) else None
        if data is not None:
            data.mkdir(parents=True, exist_ok=True)
        url = _url(site.host, node_ports[site.name])
        log_path = layout.log(node_sae_id(site.name)) if here(site.name) else None
        node_infos.append(NodeInfo(id=node_sae_id(site.name), site=site.name, x=xs[site.name], url=url,
                                   data=data, log=log_path, metrics_url=url + "/metrics",
                                   storage=site.storage.to_json()))
    links = [lk.to_json() for lk in deploy.link_states(net, epoch)]
    return ClusterState(directory=root, name=net.name, k=net.k, n=net.n, ca=auth.cert_path, config=config,
                        kmes=tuple(kmes), nodes=tuple(node_infos), saes=tuple(saes),
                        extra={"links": links, "started_at": epoch})


def _clear(layout: Layout) -> None:
    for path in (layout.state, layout.secrets):
        path.unlink(missing_ok=True)


def _pids(state: ClusterState) -> list[int]:
    gw = gateway_of(state)
    gw_pid = gw.get("pid") if gw else None
    return [p.pid for p in (*state.kmes, *state.nodes) if p.pid] + ([gw_pid] if gw_pid else [])


def _by_id(state: ClusterState) -> dict[str, tuple[str, int | None]]:
    """Process ID → (site, pid) of every process ``cluster.json`` lists, the gateway included."""
    out = {p.id: (p.site, p.pid) for p in (*state.kmes, *state.nodes)}
    if (gw := gateway_of(state)) is not None:
        site = next((s.site for s in state.saes if s.id == GATEWAY_SAE), "")
        out[GATEWAY_ID] = (site, gw.get("pid"))
    return out


def _live(state: ClusterState) -> list[str]:
    return [proc_id for proc_id, (_, pid) in _by_id(state).items() if is_ours(pid, state.directory)]


def _existing(root: Path) -> ClusterState | None:
    try:
        return ClusterState.load(root)
    except ClusterStateError as exc:
        if (root / STATE_FILE).exists():
            raise ClusterStateError(f"{exc}: if no cluster runs there, remove the file") from None
        return None


def _with_pids(state: ClusterState, pids: dict[str, int | None],
               gateway: dict[str, Any] | None) -> ClusterState:
    """``state`` with these processes' pids (and, when given, this gateway section)."""
    def put(members: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(replace(m, pid=pids[m.id]) if m.id in pids else m for m in members)

    extra = dict(state.extra)
    gw = gateway if gateway is not None else gateway_of(state)
    if gw is not None and GATEWAY_ID in pids:
        gw = {**gw, "pid": pids[GATEWAY_ID]}
    if gw is not None:
        extra["gateway"] = gw
    return replace(state, kmes=put(state.kmes), nodes=put(state.nodes), extra=extra)


def _record_pids(layout: Layout, mine: ClusterState, pids: dict[str, int | None],
                 gateway: dict[str, Any] | None) -> ClusterState:
    """Write these pids into ``cluster.json`` as it is now (another `up --only` may have written it since)."""
    with _locked(layout):
        current = _existing(layout.root) or mine
        state = _with_pids(current, pids, gateway)
        state.save()
    return state


# -- health -------------------------------------------------------------------------------------


@dataclass
class Probe:
    """One health answer: ``ok`` when the process answered 200 as the one expected."""

    ok: bool
    detail: str
    body: dict[str, Any] = field(default_factory=dict)


def _asking_cert(state: ClusterState) -> tuple[Path, Path]:
    """A certificate of this host to ask with: the client's, else any SAE's or KME's that is here."""
    layout = Layout(state.directory)
    saes = sorted(state.saes, key=lambda s: s.id != CLIENT_SAE)
    candidates = [(s.cert, s.key) for s in saes] + [layout.cert(k.id) for k in state.kmes]
    for cert, key in candidates:
        if cert.exists() and key.exists():
            return cert, key
    raise ClusterStateError(f"no certificate of cluster {state.name} in {layout.certs} to ask with")


def _client_ssl(state: ClusterState) -> Any:
    cert, key = _asking_cert(state)
    return pki.client_ssl_context(cert, key, state.ca)


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
        logs[GATEWAY_ID] = Path(gw["log"]) if gw.get("log") else None
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


def _nodes_wanted(nodes: bool | None) -> bool:
    if nodes is None:
        missing = node_command_missing()
        if missing is not None:
            log.warning("starting the KMEs only: %s", missing)
        return missing is None
    return nodes


def up(config: Path | None, root: Path, *, nodes: bool | None = None, gateway: bool = True,
       timeout_s: float = START_TIMEOUT_S, only: str | None = None,
       gateway_port: int | None = None) -> ClusterState:
    """Start the cluster of ``config`` with its state in ``root``; return its state once all are healthy.

    ``nodes`` None: start nodes when `qstore node serve` exists; the S3
    gateway starts with the nodes unless ``gateway`` is False. Refuses when a
    cluster of ``root`` still runs; clears a dead one's state first.
    ``only``: start that site's processes alone (:func:`up_site`).
    """
    if only is not None:
        return up_site(config, root, only, nodes=nodes, gateway=gateway, timeout_s=timeout_s,
                       gateway_port=gateway_port)
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
    nodes = _nodes_wanted(nodes)
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
                gw = plan_gateway(layout, port=gateway_port or net.gateway_port or 0)
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


def _check_listenable(site: Site) -> None:
    """Refuse early when ``site``'s host is no address of this machine (its processes could not listen)."""
    try:
        infos = socket.getaddrinfo(site.host, 0, type=socket.SOCK_STREAM)
    except OSError:
        raise LocalError(f"site {site.name}: cannot resolve its host {site.host!r}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr[0], 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise LocalError(f"site {site.name}'s host {site.host} is not an address of this machine: "
                                 "start each site on its own host") from None
            raise


def _gateway_port(net: Network, config: Path, asked: int | None) -> int:
    """Where the S3 gateway of a cluster across hosts listens: the same answer on every host."""
    if asked is not None and not 0 < asked <= 65535:
        raise LocalError("the gateway port must be 1 to 65535")
    if asked is not None and net.gateway_port is not None and asked != net.gateway_port:
        raise LocalError(f"--gateway-port {asked} disagrees with gateway_port = {net.gateway_port} of "
                         f"{config}: every host must agree where the gateway listens")
    return asked or net.gateway_port or DEFAULT_GATEWAY_PORT


def up_site(config: Path | None, root: Path, site: str, *, nodes: bool | None = None, gateway: bool = True,
            gateway_port: int | None = None, timeout_s: float = START_TIMEOUT_S) -> ClusterState:
    """Start one site's processes of a cluster across hosts: its KME, its node, and the S3 gateway when it
    is the gateway's site (listening on the site's host at ``gateway_port``: the cluster file's
    ``[cluster] gateway_port``, else 9000; an explicit one must agree with the file's).

    Needs fixed ports in the cluster file, the CA's certificate in ``root/ca``,
    the site's certificates (issued here when the CA's key is here) and the
    shared ``secrets.json``. ``cluster.json`` lists every process of the
    cluster; those of other sites (unless started from this same state
    directory) with pid null. Returns that state once the site is healthy.
    """
    config = (config or DEFAULT_CONFIG).absolute()
    net = Network.from_toml(config)
    me = net.site(site)
    nodes = _nodes_wanted(nodes)
    check_fixed_ports(net, config, nodes=nodes)
    gateway_port = _gateway_port(net, config, gateway_port)
    _check_listenable(me)
    layout = Layout(root)
    secrets = read_shared_secrets(layout.secrets, net)
    auth = load_authority(layout, create=False)
    gw_site = net.client_site
    runs_gateway = nodes and gateway and gw_site.name == me.name
    mine = {kme_id(me.name)} | ({node_sae_id(me.name)} if nodes and me.node else set())
    mine |= {GATEWAY_ID} if runs_gateway else set()
    with _locked(layout):
        old = _existing(root)
        state = plan(net, config, root, nodes=nodes, epoch=secrets.epoch, only=me.name, authority=auth)
        gw: dict[str, Any] | None = None
        if runs_gateway:
            ensure_cert(auth, layout, GATEWAY_SAE, "sae", ())
            gw = plan_gateway(layout, me.host, gateway_port)
            state = replace(state, extra={**state.extra, "gateway": gw})
        elif nodes and gateway:
            gw_there = remote_gateway(gw_site.host, gateway_port)
            state = replace(state, extra={**state.extra, "gateway": gw_there})
        if old is not None:
            live = set(_live(old))
            if running := sorted(live & mine):
                raise LocalError(f"site {me.name} already runs from {root} ({', '.join(running)}): "
                                 f"`qstore cluster down --only {me.name}` first")
            if live and (old.config != config or old.extra.get("started_at") != secrets.epoch):
                raise LocalError(f"another cluster runs from {root} ({len(live)} processes): "
                                 "`qstore cluster down` first")
            old_pids = _by_id(old)
            state = _with_pids(state, {i: old_pids[i][1] for i in live}, gateway_of(old) if GATEWAY_ID in live
                               else None)
        if me.name in _spent(layout).get(secrets.fingerprint, []):
            raise LocalError(f"site {me.name}'s KME has run with {layout.secrets} already and would hand "
                             "out the same keys again: draw new ones with `qstore cluster secrets --force`, "
                             "copy them to every host and restart every site")
        state.save()
    before = {i: pid for i, (_, pid) in _by_id(state).items() if i in mine}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        deadline = time.monotonic() + timeout_s
        me_kme = kme_id(me.name)
        procs[me_kme] = _spawn(kme_command(config, me.name, root), layout.log(me_kme), root)
        state = _record_pids(layout, state, {me_kme: procs[me_kme].pid}, None)
        asyncio.run(_wait_healthy(state, procs, deadline, timeout_s))
        with _locked(layout):
            _mark_spent(layout, secrets.fingerprint, me.name)
        later: dict[str, int | None] = {}
        if nodes and me.node:
            node = node_sae_id(me.name)
            procs[node] = _spawn(node_command(me.name, root), layout.log(node), root)
            later[node] = procs[node].pid
        if gw is not None:
            cmd = gateway_command(root, gateway_port, Path(gw["credentials"]), me.host)
            procs[GATEWAY_ID] = _spawn(cmd, layout.log(GATEWAY_ID), root)
            later[GATEWAY_ID] = procs[GATEWAY_ID].pid
        if later:
            state = _record_pids(layout, state, later, gw)
            asyncio.run(_wait_healthy(state, procs, deadline, timeout_s))
    except BaseException:
        _stop_children(procs.values(), timeout_s=3.0)
        with contextlib.suppress(Exception), _locked(layout):
            current = _existing(root)
            if current is not None:
                current = _with_pids(current, {i: before.get(i) for i in procs}, None)
                if _live(current):
                    current.save()
                else:
                    layout.state.unlink(missing_ok=True)  # secrets.json stays: it is the hosts' shared copy
        raise
    for p in procs.values():
        p.returncode = 0  # detached on purpose
    return state


@dataclass(frozen=True)
class Stopped:
    state_dir: Path
    stopped: tuple[str, ...]  # IDs of the processes that were running and were stopped
    was_running: bool  # whether there was a cluster state at all


def down(root: Path, *, timeout_s: float = STOP_TIMEOUT_S, only: str | None = None) -> Stopped:
    """Stop the processes of the cluster that run from ``root`` (``only``: that site's alone); keep the CA,
    certificates, logs and node data.

    Processes of other hosts (pid null) are not touched. Once none of
    ``root`` runs, ``cluster.json`` and ``secrets.json`` are removed (seeds
    are never used twice).
    """
    layout = Layout(root)
    with _locked(layout) if root.exists() else contextlib.nullcontext():
        state = _existing(root)
        if state is None:
            if not _shared_unused(layout.secrets):
                layout.secrets.unlink(missing_ok=True)
            return Stopped(root, (), False)
        procs = _by_id(state)
        if only is not None and only not in {site for site, _ in procs.values()}:
            raise LocalError(f"cluster {state.name} has no site {only!r} here "
                             f"(sites: {', '.join(dict.fromkeys(site for site, _ in procs.values()))})")
        chosen = {pid: proc_id for proc_id, (site, pid) in procs.items() if pid and only in (None, site)}
        stopped = _stop(chosen, root, timeout_s)
        if not _live(state):
            _clear(layout)
    return Stopped(root, tuple(chosen[pid] for pid in stopped), True)


async def _status(state: ClusterState) -> dict[str, Any]:
    import aiohttp

    processes = []
    gw = gateway_of(state) or {}
    for kind, proc_id, url, expect in _health_targets(state):
        if kind == "gateway":
            site, pid, purl, murl = state.sae(GATEWAY_SAE).site, gw.get("pid"), gw.get("url", ""), \
                gw.get("metrics_url")
        else:
            info = state.kme(proc_id) if kind == "kme" else state.node(proc_id)
            site, pid, purl, murl = info.site, info.pid, info.url, info.metrics_url
        local = pid is not None
        processes.append({"kind": kind, "id": proc_id, "site": site, "pid": pid, "local": local,
                          "alive": is_ours(pid, state.directory) if local else None, "url": purl,
                          "metrics_url": murl, "health": None, "reachable": None, "_probe": (url, expect)})
    links = links_of(state)
    connector = aiohttp.TCPConnector(ssl=_client_ssl(state), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        probes = await asyncio.gather(*(_probe(session, *p["_probe"]) for p in processes))
        pools = await asyncio.gather(*(_probe(session, k.url + "/kme/v1/links", ("KME_ID", k.id))
                                       for k in state.kmes))
        scrapes = await asyncio.gather(*(_scrape(session, p["metrics_url"]) for p in processes))
    for proc, text in zip(processes, scrapes, strict=True):
        proc["figures"] = None if text is None else _figures(proc["kind"], text)
    for proc, probe in zip(processes, probes, strict=True):
        del proc["_probe"]
        proc["health"] = probe.detail  # asked even when the recorded pid is gone: one may run by hand
        proc["reachable"] = probe.ok
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


async def _scrape(session: Any, url: str | None) -> str | None:
    """A process's /metrics text, or None (no URL, unreachable, or an older process without metrics)."""
    if not url:
        return None
    try:
        async with asyncio.timeout(5), session.get(url) as resp:
            return (await resp.text()) if resp.status == 200 else None
    except Exception:  # unreachable, TLS, timeout, bad encoding: status reports, a scrape never fails it
        return None


def _figures(kind: str, text: str) -> dict[str, float]:
    """The few figures `status` shows of a process, from its metrics (qstore.telemetry's names)."""
    from qstore.telemetry import Figures

    f = Figures(text)
    prefix = {"kme": "qstore_kme", "node": "qstore_node", "gateway": "qstore_s3"}[kind]
    out = {"requests": f.value(f"{prefix}_requests_total"), "errors": f.value(f"{prefix}_errors_total")}
    if kind == "node":
        out |= {"objects": f.value("qstore_node_objects"),
                "stored_bytes": f.value("qstore_node_stored_bytes"),
                "key_in_bytes": f.value("qstore_node_key_bytes_total", direction="in"),
                "key_out_bytes": f.value("qstore_node_key_bytes_total", direction="out"),
                "mpc_queries": f.value("qstore_node_mpc_queries_total"),
                "mpc_failed": f.value("qstore_node_mpc_queries_total", status="failed")}
    if kind == "kme":
        out["key_delivered_bytes"] = f.value("qstore_kme_key_delivered_bytes_total")
    return out


def status(root: Path) -> dict[str, Any]:
    """Each process (local: alive?; remote: reachable?; healthy?) and each link's pools in both directions,
    as the KMEs report them."""
    return asyncio.run(_status(ClusterState.load(root)))


def healthy(report: dict[str, Any]) -> bool:
    """Every local process alive and every process, local or remote, answering its health check."""
    return all((p["alive"] or not p.get("local", True)) and p["health"] == "ok" for p in report["processes"])


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

