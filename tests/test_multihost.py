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
    conf.write_text(CONFIG.format(*free[:6]))
    gw_port = free[6]
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
    ups = {site: cli("cluster", "up", conf, "--only", site, "--state", host, "--gateway-port", gw_port)
           for site, host in (("a", hac), ("b", hb), ("c", hac))}
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
