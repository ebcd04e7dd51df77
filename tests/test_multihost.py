"""A cluster across hosts: `qstore ca init|issue|list`, `qstore cluster secrets`, `qstore cluster up --only`.

Hosts are simulated by state directories on 127.0.0.1: an admin directory
holds the CA (with its key) and draws the shared secrets; each "host" gets a
copy of ``ca/ca.pem`` and ``secrets.json`` and the certificates issued for
its sites, never the CA key. Sites a and c share one state directory (two
`up --only` into it at once), site b has its own. Real processes throughout:
a put/get round trip through QStore crosses all three sites, then `down` on
one "host" stops its processes alone and a get still works from the others.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client import cluster
from client.cli import main
from client.storage import QStore
from qkd_sim import deploy, pki
from qkd_sim.network import Network
from qstore.cluster import ClusterState

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: object) -> subprocess.Popen[str]:
    """`qstore ARGS` in a process of its own (as on a host), from the repository root."""
    return subprocess.Popen([sys.executable, "-m", "client.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})  # tables unabridged


def finish(p: subprocess.Popen[str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run(capsys, *args: object) -> tuple[int, str, str]:
    """`qstore ARGS` in this process (fast: no second of imports); (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qstore: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the CA, offline -----------------------------------------------------------------------------


def test_ca_init_issue_list_and_refusals(tmp_path, capsys):
    admin = tmp_path / "admin"
    code, out, _ = run(capsys, "ca", "init", "--state", admin, "--json")
    assert code == 0
    made = json.loads(out)
    ca_pem, ca_key = admin / "ca" / "ca.pem", admin / "ca" / "ca.key"
    assert made["cert"] == str(ca_pem) and made["kind"] == "ca" and mode(ca_key) == 0o600
    ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    first = ca_pem.read_bytes()
    one_line_error(*run(capsys, "ca", "init", "--state", admin)[::2], "a CA exists", "--force")
    assert ca_pem.read_bytes() == first

    issued = {}
    for args in (("kme.x", "--host", "10.1.2.3", "kme-x.example"), ("node.x", "--host", "10.1.2.3"),
                 ("analyst",), ("gw2", "--kind", "node", "--host", "127.0.0.1")):
        code, out, err = run(capsys, "ca", "issue", *args, "--state", admin, "--json")
        assert code == 0, err
        issued[args[0]] = json.loads(out)
    expect = {"kme.x": ("kme", pki.KME_URN), "node.x": ("node", pki.SAE_URN), "analyst": ("sae", pki.SAE_URN),
              "gw2": ("node", pki.SAE_URN)}
    for name, (kind, urn) in expect.items():
        facts = issued[name]
        cert_path, key_path = Path(facts["cert"]), Path(facts["key"])
        assert cert_path == admin / "certs" / f"{name}.pem" and mode(key_path) == 0o600
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)  # raises unless signed by this CA
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [urn + name]
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert (ExtendedKeyUsageOID.SERVER_AUTH in usages) == (kind != "sae")
        assert facts["kind"] == kind and facts["subject"] == name
    assert issued["kme.x"]["hosts"] == ["10.1.2.3", "kme-x.example"] and issued["analyst"]["hosts"] == []
    # the key matches the certificate: a TLS context loads the pair
    pki.client_ssl_context(issued["analyst"]["cert"], issued["analyst"]["key"], ca_pem)

    # no overwrite without --force; kinds need (or refuse) hosts; --out for a site's copy
    before = (admin / "certs" / "kme.x.pem").read_bytes()
    one_line_error(*run(capsys, "ca", "issue", "kme.x", "--host", "h", "--state", admin)[::2],
                   "exists", "--force")
    assert (admin / "certs" / "kme.x.pem").read_bytes() == before
    assert run(capsys, "ca", "issue", "kme.x", "--host", "h", "--state", admin, "--force")[0] == 0
    assert (admin / "certs" / "kme.x.pem").read_bytes() != before
    one_line_error(*run(capsys, "ca", "issue", "kme.y", "--state", admin)[::2], "--host")
    one_line_error(*run(capsys, "ca", "issue", "client", "--host", "h", "--state", admin)[::2], "no hosts")
    one_line_error(*run(capsys, "ca", "issue", "bad name", "--state", admin)[::2], "certificate name")
    site = tmp_path / "site" / "certs"
    assert run(capsys, "ca", "issue", "node.y", "--host", "h", "--state", admin, "--out", site)[0] == 0
    assert sorted(p.name for p in site.iterdir()) == ["node.y.key", "node.y.pem"]
    assert mode(site / "node.y.key") == 0o600

    code, out, _ = run(capsys, "ca", "list", "--state", admin, "--json")
    listed = json.loads(out)
    assert listed["ca"]["has_key"] and listed["ca"]["subject"] == "qstore-dev-ca"
    rows = {(e["subject"], e["kind"]) for e in listed["issued"]}
    assert rows == {("kme.x", "kme"), ("node.x", "node"), ("analyst", "sae"), ("gw2", "node"),
                    ("node.y", "node")}
    assert all(not e["expired"] and e["not_after"] > "2026" for e in listed["issued"])
    code, out, _ = run(capsys, "ca", "list", "--state", admin)
    assert code == 0 and "node.y" in out and "analyst" in out

    # a site's host has the CA certificate only: it cannot issue, it can list what it holds
    host = tmp_path / "host"
    (host / "ca").mkdir(parents=True)
    shutil.copy(ca_pem, host / "ca" / "ca.pem")
    one_line_error(*run(capsys, "ca", "issue", "client", "--state", host)[::2], "no CA key")
    one_line_error(*run(capsys, "ca", "issue", "client", "--state", tmp_path / "none")[::2], "ca init")
    code, out, _ = run(capsys, "ca", "list", "--state", host, "--json")
    assert code == 0 and not json.loads(out)["ca"]["has_key"]

    # --force makes a new CA: what the old one issued no longer verifies
    assert run(capsys, "ca", "init", "--state", admin, "--force")[0] == 0
    new_ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    with pytest.raises(Exception):
        x509.load_pem_x509_certificate((admin / "certs" / "analyst.pem").read_bytes()) \
            .verify_directly_issued_by(new_ca)


# -- cluster.json ---------------------------------------------------------------------------------


def test_cluster_json_without_metrics_url_still_reads(tmp_path):
    old = {"format": 1, "name": "old", "k": 2, "n": 2, "ca": "/x/ca.pem",
           "kmes": [{"id": "kme.a", "site": "a", "url": "https://127.0.0.1:1", "pid": None}],
           "nodes": [{"id": "node.a", "site": "a", "x": 1, "url": "https://127.0.0.1:2"}]}
    state = ClusterState.from_json(old, tmp_path)
    assert state.kmes[0].metrics_url is None and state.nodes[0].metrics_url is None
    new = ClusterState.from_json(json.loads(json.dumps(state.to_json())), tmp_path)
    assert new == state
    bad = {**old, "kmes": [{**old["kmes"][0], "metrics_url": "ftp://x"}]}
    with pytest.raises(cluster.ClusterStateError, match="metrics_url"):
        ClusterState.from_json(bad, tmp_path)


def test_a_plan_gives_every_process_its_metrics_url(tmp_path):
    net = Network.from_toml(ROOT / "deploy" / "local.toml")
    state = cluster.plan(net, ROOT / "deploy" / "local.toml", tmp_path, nodes=True, epoch=1.0)
    assert all(p.metrics_url == p.url + "/metrics" for p in (*state.kmes, *state.nodes))
    gw = cluster.plan_gateway(cluster.Layout(tmp_path))
    assert gw["metrics_url"] == gw["url"] + "/-/metrics"


# -- one cluster across three "hosts" -------------------------------------------------------------

CONFIG = """\
[cluster]
name = "metro"
k = 2

[[sites]]
name = "a"            # the first site: clients and the S3 gateway attach here
kme_port = {0}
node_port = {1}
saes = ["analyst"]
[[sites]]
name = "b"
kme_port = {2}
node_port = {3}
[[sites]]
name = "c"
kme_port = {4}
node_port = {5}

[[links]]
a = "a"
b = "b"
rate = "unlimited"
[[links]]
a = "b"
b = "c"
rate = "unlimited"
[[links]]
a = "c"
b = "a"
rate_bps = 1e9
"""


def test_only_needs_fixed_ports_secrets_and_certificates(tmp_path, capsys):
    free = cluster._free_ports(["127.0.0.1"] * 6)
    zero = tmp_path / "zero.toml"
    zero.write_text(CONFIG.format(*free[:4], 0, free[5]))
    one_line_error(*run(capsys, "cluster", "up", zero, "--only", "a", "--state", tmp_path / "s")[::2],
                   "site c has no kme_port", "--only needs fixed ports")
    conf = tmp_path / "metro.toml"
    conf.write_text(CONFIG.format(*free))
    one_line_error(*run(capsys, "cluster", "up", conf, "--only", "z", "--state", tmp_path / "s")[::2],
                   "no site 'z'")
    one_line_error(*run(capsys, "cluster", "up", conf, "--only", "a", "--state", tmp_path / "s")[::2],
                   "no secrets.json", "qstore cluster secrets")
    host = tmp_path / "host"
    assert run(capsys, "cluster", "secrets", conf, "--state", host)[0] == 0
    assert mode(host / "secrets.json") == 0o600
    one_line_error(*run(capsys, "cluster", "secrets", conf, "--state", host)[::2], "exists", "--force")
    assert run(capsys, "cluster", "down", "--state", host)[0] == 0
    assert (host / "secrets.json").exists()  # copied for a coming `up --only`: kept
    one_line_error(*run(capsys, "cluster", "up", conf, "--only", "a", "--state", host)[::2],
                   "no CA", "qstore ca init")
    admin = tmp_path / "admin"
    assert run(capsys, "ca", "init", "--state", admin)[0] == 0
    (host / "ca").mkdir()
    shutil.copy(admin / "ca" / "ca.pem", host / "ca" / "ca.pem")
    one_line_error(*run(capsys, "cluster", "up", conf, "--only", "b", "--state", host)[::2],
                   "kme.b.pem", "qstore ca issue kme.b --kind kme --host 127.0.0.1")
    assert not (host / "cluster.json").exists()
    # secrets of a single-host run are not shared ones
    single = tmp_path / "single"
    single.mkdir()
    cluster.write_secrets(single / "secrets.json", deploy.Seeds.new(Network.from_toml(conf)))
    (single / "ca").mkdir()
    shutil.copy(admin / "ca" / "ca.pem", single / "ca" / "ca.pem")
    one_line_error(*run(capsys, "cluster", "up", conf, "--only", "b", "--state", single)[::2],
                   "single-host")


def _is_up(root: Path, pid: int | None) -> bool:
    return cluster.is_ours(pid, root)


def test_three_sites_on_two_hosts_put_get_and_down_on_one_host(tmp_path, capsys):
    free = cluster._free_ports(["127.0.0.1"] * 7)
    conf = tmp_path / "metro.toml"
    gw_port = free[6]  # in the cluster file, so that every host agrees where the gateway listens
    conf.write_text(CONFIG.format(*free[:6]).replace("k = 2\n", f"k = 2\ngateway_port = {gw_port}\n"))
    admin, hac, hb = tmp_path / "admin", tmp_path / "host-ac", tmp_path / "host-b"

    # on the admin's machine: the CA, the secrets, every site's certificates (the CA key stays here)
    assert run(capsys, "ca", "init", "--state", admin)[0] == 0
    assert run(capsys, "cluster", "secrets", conf, "--state", admin)[0] == 0
    bundles = {hac: ["kme.a", "node.a", "kme.c", "node.c", "client", "gateway"], hb: ["kme.b", "node.b"]}
    for host, names in bundles.items():
        for name in names:
            hosts = ("--host", "127.0.0.1") if name.startswith(("kme.", "node.")) else ()
            code, _, err = run(capsys, "ca", "issue", name, *hosts, "--state", admin, "--out", host / "certs")
            assert code == 0, err
        (host / "ca").mkdir(parents=True)
        shutil.copy(admin / "ca" / "ca.pem", host / "ca" / "ca.pem")
        shutil.copy(admin / "secrets.json", host / "secrets.json")
        assert not (host / "ca" / "ca.key").exists()

    # each site by its own `up --only`, all at once; a and c into one state directory
    # b's host names no port: the file's; one that disagrees with the file is refused
    wrong = run(capsys, "cluster", "up", conf, "--only", "a", "--state", hac, "--gateway-port", gw_port + 1)
    one_line_error(*wrong[::2], f"--gateway-port {gw_port + 1} disagrees with gateway_port = {gw_port}")
    ups = {site: cli("cluster", "up", conf, "--only", site, "--state", host, *extra)
           for site, host, extra in (("a", hac, ("--gateway-port", gw_port)), ("b", hb, ()), ("c", hac, ()))}
    done = {site: finish(p) for site, p in ups.items()}
    try:
        for site, res in done.items():
            assert res.returncode == 0, f"{site}: {res.stderr}"
        ac, b = ClusterState.load(hac), ClusterState.load(hb)
        for state in (ac, b):  # every process with its URL from the cluster file, on every host
            urls = [u for kme, node in zip(state.kmes, state.nodes, strict=True) for u in (kme.url, node.url)]
            assert urls == [f"https://127.0.0.1:{port}" for port in free[:6]]
            assert all(p.metrics_url == p.url + "/metrics" for p in (*state.kmes, *state.nodes))
        assert all(_is_up(hac, p.pid) for p in (*ac.kmes, *ac.nodes) if p.site in ("a", "c"))
        assert [p.pid for p in (*ac.kmes, *ac.nodes) if p.site == "b"] == [None, None]
        assert [p.site for p in (*b.kmes, *b.nodes) if p.pid] == ["b", "b"]
        assert all(_is_up(hb, p.pid) for p in (*b.kmes, *b.nodes) if p.pid)
        gw, gw_b = cluster.gateway_of(ac), cluster.gateway_of(b)
        assert gw["url"] == gw_b["url"] == f"http://127.0.0.1:{gw_port}" and _is_up(hac, gw["pid"])
        assert gw["metrics_url"] == gw["url"] + "/-/metrics" and gw_b["pid"] is None
        assert "secret_key" not in gw_b and "secret_key" in gw
        assert ac.extra["links"] == b.extra["links"]  # the same epoch on every host, from secrets.json

        # status on b's host (no client certificate there): the other sites are reachable
        res = finish(cli("cluster", "status", "--state", hb, "--json"))
        assert res.returncode == 0, res.stdout + res.stderr
        report = json.loads(res.stdout)
        assert {(p["id"], p["local"], p["reachable"]) for p in report["processes"]} == {
            ("kme.a", False, True), ("kme.b", True, True), ("kme.c", False, True), ("node.a", False, True),
            ("node.b", True, True), ("node.c", False, True), ("gateway", False, True)}

        data = os.urandom(300_000)

        async def put_get() -> None:
            async with QStore(ClusterState.load(hac), chunk_size=64 << 10) as qs:
                await qs.create_bucket("default")
                await qs.put("default", "metro/one.bin", data)
                assert await qs.get_bytes("default", "metro/one.bin") == data

        asyncio.run(put_get())

        # `down --only c` on the shared host: c's processes alone stop
        code, out, err = run(capsys, "cluster", "down", "--only", "c", "--state", hac, "--json")
        assert code == 0, err
        assert sorted(json.loads(out)["stopped"]) == ["kme.c", "node.c"]
        assert not any(_is_up(hac, p.pid) for p in (*ac.kmes, *ac.nodes) if p.site == "c")
        assert all(_is_up(hac, p.pid) for p in (*ac.kmes, *ac.nodes) if p.site == "a")
        assert _is_up(hac, gw["pid"])
        assert all(_is_up(hb, p.pid) for p in (*b.kmes, *b.nodes) if p.pid)
        assert (hac / "cluster.json").exists()

        async def get() -> bytes:
            async with QStore(ClusterState.load(hac)) as qs:
                return await qs.get_bytes("default", "metro/one.bin")

        assert asyncio.run(get()) == data  # k = 2: a and b suffice

        # c again with the same secrets: refused, its KME would hand out the same keys again
        one_line_error(*run(capsys, "cluster", "up", conf, "--only", "c", "--state", hac,
                            "--gateway-port", gw_port)[::2],
                   "same keys again", "qstore cluster secrets --force")

        # b's host goes down: b alone stops, and b's host forgets the run
        code, out, err = run(capsys, "cluster", "down", "--state", hb, "--json")
        assert code == 0 and sorted(json.loads(out)["stopped"]) == ["kme.b", "node.b"]
        assert not (hb / "cluster.json").exists() and not (hb / "secrets.json").exists()
        assert (hb / "certs" / "node.b.pem").exists() and (hb / "nodes" / "b").is_dir()
        assert all(_is_up(hac, p.pid) for p in (*ac.kmes, *ac.nodes) if p.site == "a")
        report = cluster.status(hac)
        assert not cluster.healthy(report)
        by_id = {p["id"]: p for p in report["processes"]}
        assert by_id["kme.b"]["local"] is False and by_id["kme.b"]["reachable"] is False
        assert by_id["node.c"]["local"] is True and by_id["node.c"]["alive"] is False
        assert by_id["kme.a"]["alive"] and by_id["kme.a"]["reachable"] and by_id["gateway"]["reachable"]
        res = finish(cli("cluster", "status", "--state", hac))
        assert res.returncode == 1 and "UNREACHABLE" in res.stdout and "remote" in res.stdout, res.stdout
    finally:
        for host in (hac, hb):
            cluster.down(host)
    assert not any(_is_up(hac, p.pid) for p in (*ac.kmes, *ac.nodes))
    assert not (hac / "cluster.json").exists()


# -- five sites in network namespaces ------------------------------------------------------------

NETNS_STORAGE = 5  # storage sites; the desk (clients, gateway) is one more
NETNS_DELAY_MS = 5.0  # one way between two sites: half on the sender's veth, half on the bridge's port
NETNS_MIB = int(os.environ.get("QSTORE_NETNS_MIB", "64"))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


class Namespaces:
    """One network namespace per site (10.88.0.i/24), made and removed by the test; nothing is added to the
    namespace the test runs in. Names carry the test's pid. Inter-site links have NETNS_DELAY_MS one way:
    veths on a bridge namespace with `tc netem` where the kernel has it, else TUN devices joined by
    tests/netdelay.py, a switch that holds every packet for the delay (this CI kernel has no sch_netem)."""

    def __init__(self, sites: int):
        tag = f"qs{os.getpid() % 100000}"
        self.bridge = f"{tag}br"
        self.sites = [f"{tag}s{i}" for i in range(1, sites + 1)]
        self.made: list[str] = []
        self.switch: subprocess.Popen[str] | None = None
        self.how = ""

    def host(self, i: int) -> str:
        return f"10.88.0.{i}"

    def create(self) -> None:
        for ns in (self.bridge, *self.sites):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        probe = subprocess.run(["ip", "netns", "exec", self.bridge, "tc", "qdisc", "add", "dev", "lo", "root",
                                "netem", "delay", "1ms"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            self._veths_with_netem()
        else:
            self._tun_switch()

    def _veths_with_netem(self) -> None:
        self.how = "veth + tc netem"
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        half = f"{NETNS_DELAY_MS / 2 * 1000:.0f}us"  # half on the sender's veth, half on the bridge's port
        for i, ns in enumerate(self.sites, start=1):
            _ip("-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", f"b{i}", "netns", self.bridge)
            _ip("-n", self.bridge, "link", "set", f"b{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.host(i)}/24", "dev", "v0")
            _ip("-n", ns, "link", "set", "v0", "up")
            for where, dev in ((ns, "v0"), (self.bridge, f"b{i}")):
                _ip("netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", half)

    def _tun_switch(self) -> None:
        self.how = "TUN + tests/netdelay.py (no sch_netem in this kernel)"
        self.switch = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "netdelay.py"), "--delay-ms", str(NETNS_DELAY_MS),
             *(f"{ns}={self.host(i)}" for i, ns in enumerate(self.sites, start=1))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.switch.stdout.readline() if self.switch.stdout else ""
        assert line.strip() == "ready", self.switch.stderr.read() if self.switch.stderr else line

    def rtt_ms(self, a: int, b: int) -> float:
        """Median TCP connect time from site A to a listener at site B: one round trip."""
        listener = self.start(b, sys.executable, "-c", RTT_LISTENER, self.host(b))
        try:
            assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
            res = finish(self.start(a, sys.executable, "-c", RTT_PROBE, self.host(b)), 60)
            assert res.returncode == 0, res.stderr
            return float(res.stdout)
        finally:
            listener.kill()
            listener.wait()

    def remove(self) -> None:
        if self.switch is not None:
            self.switch.kill()
            self.switch.wait()
        for ns in reversed(self.made):
            _ip("netns", "del", ns, check=False)
        self.made.clear()

    def run(self, i: int, *args: object, env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """`qstore ARGS` inside site i's namespace."""
        return finish(self.start(i, sys.executable, "-m", "client.cli", *args, env=env), timeout)

    def start(self, i: int, *cmd: object, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.sites[i - 1], *map(str, cmd)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "COLUMNS": "200", **(env or {})})


def _netns_or_skip(tmp_path: Path) -> Namespaces:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (`ip`)")
    nets = Namespaces(NETNS_STORAGE + 1)
    probe = _ip("netns", "add", nets.bridge, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
    _ip("netns", "del", nets.bridge, check=False)
    return nets


RTT_LISTENER = """
import socket, sys
s = socket.create_server((sys.argv[1], 7999))
print("listening", flush=True)
while True:
    s.accept()[0].close()
"""

RTT_PROBE = """
import socket, statistics, sys, time
times = []
for _ in range(7):
    t = time.perf_counter()
    socket.create_connection((sys.argv[1], 7999), timeout=10).close()
    times.append(time.perf_counter() - t)
print(statistics.median(times) * 1000)
"""

NETNS_SCHEMA = """
[table]
min_group_size = 10
[columns]
age    = { type = "integer", min = 0, max = 120 }
weight = { type = "fixed", decimals = 1, min = 20, max = 250 }
"""

S3_ROUND_TRIP = """
import json, os, sys, boto3
from botocore.config import Config
gw = json.loads(sys.argv[1])
s3 = boto3.client("s3", endpoint_url=gw["url"], aws_access_key_id=gw["access_key"],
                  aws_secret_access_key=gw["secret_key"], region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}))
body = os.urandom(3 << 20)
s3.create_bucket(Bucket="metro")
s3.put_object(Bucket="metro", Key="s3.bin", Body=body)
assert s3.get_object(Bucket="metro", Key="s3.bin")["Body"].read() == body
print(json.dumps([o["Key"] for o in s3.list_objects_v2(Bucket="metro")["Contents"]]))
"""


def test_five_sites_in_network_namespaces(tmp_path, capsys, record_property):
    """Five storage sites and a client site ("desk", as in deploy/local.toml), each in a namespace of its
    own with its own address, started there by `up --only` from its own state directory; put/get, an S3
    round trip and a statistics query from the desk, then the loss of the fifth site."""
    nets = _netns_or_skip(tmp_path)
    sites = [f"s{i}" for i in range(1, NETNS_STORAGE + 1)] + ["desk"]
    desk = NETNS_STORAGE + 1
    conf = tmp_path / "netns.toml"
    text = '[cluster]\nname = "netns"\nk = 3\n\n'
    for i, site in enumerate(sites, start=1):
        text += f'[[sites]]\nname = "{site}"\nhost = "{nets.host(i)}"\nkme_port = 7000\n'
        text += 'node = false\nsaes = ["hospital-a", "analyst"]\n' if i == desk else "node_port = 7001\n"
    text += "".join(f'[[links]]\na = "{a}"\nb = "{b}"\nrate = "unlimited"\n'
                    for j, a in enumerate(sites) for b in sites[j + 1:])
    conf.write_text(text)
    admin = tmp_path / "admin"
    hosts = {i: tmp_path / sites[i - 1] for i in range(1, desk + 1)}
    assert run(capsys, "ca", "init", "--state", admin)[0] == 0
    assert run(capsys, "cluster", "secrets", conf, "--state", admin)[0] == 0
    for i, host in hosts.items():
        site = sites[i - 1]
        names = [f"kme.{site}"] + (["client", "gateway", "hospital-a", "analyst"] if i == desk
                                   else [f"node.{site}"])
        for name in names:
            flags = ("--host", nets.host(i)) if name.startswith(("kme.", "node.")) else ()
            assert run(capsys, "ca", "issue", name, *flags, "--state", admin, "--out", host / "certs")[0] == 0
        (host / "ca").mkdir(parents=True)
        shutil.copy(admin / "ca" / "ca.pem", host / "ca" / "ca.pem")
        shutil.copy(admin / "secrets.json", host / "secrets.json")

    try:
        nets.create()
        rtt = nets.rtt_ms(1, 2)  # the links really are slow: a round trip is two one-way delays
        assert 2 * NETNS_DELAY_MS * 0.9 <= rtt < 2 * NETNS_DELAY_MS + 40, (nets.how, rtt)
        record_property("netns_links", json.dumps({"how": nets.how, "rtt_ms": round(rtt, 1)}))
        ups = [nets.start(i, sys.executable, "-m", "client.cli", "cluster", "up", conf,
                          "--only", sites[i - 1], "--state", hosts[i], "--timeout", "60") for i in hosts]
        for i, p in zip(hosts, ups, strict=True):
            res = finish(p)
            assert res.returncode == 0, f"{sites[i - 1]}: {res.stderr}"
        res = nets.run(3, "cluster", "status", "--state", hosts[3], "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        assert all(p["reachable"] for p in json.loads(res.stdout)["processes"])

        # put/get from the desk, every share crossing the (delayed) links
        data = os.urandom(NETNS_MIB << 20)
        src, out = tmp_path / "big.bin", tmp_path / "big.out"
        src.write_bytes(data)
        res = nets.run(desk, "put", src, "netns/big.bin", "--state", hosts[desk], "--json")
        assert res.returncode == 0, res.stderr
        put = json.loads(res.stdout)
        res = nets.run(desk, "get", "netns/big.bin", "-o", out, "--state", hosts[desk], "--json")
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        assert out.read_bytes() == data
        for what, doc in (("put", put), ("get", got)):  # shown with -rA; the README's figures come from here
            figures = {"MiB/s": round(doc["size"] / doc["seconds"] / 2**20, 1), "key_bytes": doc["key_bytes"],
                       "links": doc["links"], "delay_ms": NETNS_DELAY_MS}
            record_property(f"netns_{what}", json.dumps(figures))
            print(f"{what} {NETNS_MIB} MiB:", json.dumps(figures))

        # an S3 round trip through the gateway at the desk
        res = nets.run(desk, "s3", "credentials", "--state", hosts[desk], "--json")
        assert res.returncode == 0, res.stderr
        s3 = finish(nets.start(desk, sys.executable, "-c", S3_ROUND_TRIP, res.stdout.strip()))
        assert s3.returncode == 0 and json.loads(s3.stdout) == ["s3.bin"], s3.stderr

        # a statistics query: the nodes compute over the links, the analyst gets the mean
        rows = [(20 + (7 * r) % 70, 50 + (13 * r) % 60 + 0.5) for r in range(120)]
        csv = tmp_path / "p.csv"
        csv.write_text("age,weight\n" + "".join(f"{a},{w:.1f}\n" for a, w in rows))
        schema = tmp_path / "schema.toml"
        schema.write_text(NETNS_SCHEMA)
        for args in (("table", "put", csv, "--name", "patients", "--schema", schema, "--as", "hospital-a"),
                     ("table", "grant", "patients", "analyst", "--as", "hospital-a")):
            res = nets.run(desk, *args, "--state", hosts[desk])
            assert res.returncode == 0, res.stderr
        began = time.monotonic()
        res = nets.run(desk, "stats", "mean", "weight", "--table", "patients", "--as", "analyst", "--json",
                       "--state", hosts[desk])
        assert res.returncode == 0, res.stderr
        print("links:", nets.how, f"round trip {rtt:.1f} ms;",
              f"stats mean over {len(rows)} rows: {time.monotonic() - began:.2f} s (CLI start included)")
        mean = json.loads(res.stdout)
        assert mean["rows"] == len(rows)
        assert mean["value"] == pytest.approx(sum(w for _, w in rows) / len(rows))

        # the fifth storage site is lost: its host stops, the data still reads from four
        res = nets.run(5, "cluster", "down", "--state", hosts[5], "--json")
        assert res.returncode == 0 and sorted(json.loads(res.stdout)["stopped"]) == ["kme.s5", "node.s5"]
        out.unlink()
        res = nets.run(desk, "get", "netns/big.bin", "-o", out, "--state", hosts[desk], "--json")
        assert res.returncode == 0, res.stderr
        assert out.read_bytes() == data and "s5" not in json.loads(res.stdout)["nodes"]
        res = nets.run(2, "cluster", "status", "--state", hosts[2], "--json")
        assert res.returncode == 1
        down = {p["id"] for p in json.loads(res.stdout)["processes"] if not p["reachable"]}
        assert down == {"kme.s5", "node.s5"}
    finally:
        for i, host in hosts.items():
            if (host / "cluster.json").exists():
                cluster.down(host)  # signals by pid: works from outside the namespace
        nets.remove()
