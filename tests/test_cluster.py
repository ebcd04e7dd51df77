"""The local cluster launcher: `qstore cluster up|status|down` and `qstore kme serve`, as real processes.

First the pure parts (site options, a KME's config from the cluster file),
then a whole ``deploy/local.toml`` cluster of KME processes on 127.0.0.1 in a
temporary state directory: started by the CLI in its own process (as a user
would), its SAE certificates used to fetch keys, directly and relayed.
Nodes are left out (``--no-nodes``): the node service has its own tests.
"""

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client import cluster
from client.cli import main
from qkd_sim import deploy
from qkd_sim.network import ConfigError, Network
from qkd_sim.sae import SAEClient, SAEConfig
from qstore.cluster import ClusterState

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "deploy" / "local.toml"

SMALL = """\
[cluster]
name = "small"
k = 2

[[sites]]
name = "a"
[[sites]]
name = "b"
[[sites]]
name = "desk"
node = false

[[links]]
a = "a"
b = "b"
rate = "unlimited"
[[links]]
a = "b"
b = "desk"
rate_bps = 1e6
"""


def cli(*args, timeout=60):
    """Run `qstore ARGS` in a process of its own, from the repository root."""
    return subprocess.run([sys.executable, "-m", "client.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def gone(pid, root):
    return not cluster.is_ours(pid, root)


def sae_client(state, sae_id):
    sae = state.sae(sae_id)
    return SAEClient(SAEConfig(sae_id=sae_id, kme_url=state.kme_url_of(sae_id), cert=sae.cert, key=sae.key,
                               ca=state.ca, wait_s=5.0))


async def exchange(state, master, slave, number=2, size=256):
    """enc_keys at the master's KME, dec_keys at the slave's: both must get the same keys."""
    async with sae_client(state, master) as m, sae_client(state, slave) as s:
        sent = await m.get_enc_keys(slave, number, size)
        got = await s.get_dec_keys(master, [k.key_id for k in sent])
    assert got == sent and len(sent) == number
    return sent


# -- without processes ----------------------------------------------------------------------


def test_sites_say_which_run_a_node_and_x_follows_the_file():
    net = Network.from_toml(LOCAL)
    assert [s.name for s in net.node_sites] == ["site1", "site2", "site3", "site4", "site5"]
    assert net.n == 5 and net.client_site.name == "client"
    assert deploy.node_xs(net) == {f"site{i}": i for i in range(1, 6)}
    assert deploy.sae_sites(net) == {**{f"node.site{i}": f"site{i}" for i in range(1, 6)},
                                     "client": "client", "gateway": "client", "hospital-a": "client",
                                     "hospital-b": "client", "hospital-c": "client", "analyst": "client"}
    taken = {"cluster": {"k": 2}, "sites": [{"name": "p"}, {"name": "q", "saes": ["client"]}]}
    with pytest.raises(ConfigError, match="already taken"):
        deploy.sae_sites(Network.from_dict(taken))
    with pytest.raises(ConfigError, match="saes"):
        Network.from_dict({"cluster": {"k": 2}, "sites": [{"name": "p", "saes": ["a b"]}, {"name": "q"}]})
    tokyo = Network.from_toml(ROOT / "deploy" / "tokyo.toml", lambda link: 1000.0)
    assert tokyo.client_site.name == "client" and tokyo.n == 4
    only_nodes = Network.from_dict({"cluster": {"k": 2}, "sites": [{"name": "p"}, {"name": "q"}]})
    assert only_nodes.client_site.name == "p"  # no client site: clients attach to the first


TWO = '[[sites]]\nname = "a"\n[[sites]]\nname = "b"\n'


@pytest.mark.parametrize("text,needle", [
    (TWO + "kme_prot = 1\n", r"\[\[sites\]\] #2 \(b\): unknown key\(s\) kme_prot"),
    (TWO + '[[links]]\na = "a"\nb = "b"\nrate = "unlimited"\nfoo = 1\n',
     r"\[\[links\]\] #1 \(a-b\): unknown key\(s\) foo"),
    ('[cluster]\nk = 3\nn = 5\n[[sites]]\nname = "a"\n', r"\[cluster\]: unknown key\(s\) n"),
    (TWO + '[[sites]]\nname = "c"\nnode = false\n', "k = 3 needs at least 3"),
    ('[[sites]]\nname = "a"\nkme_port = 70000\n', "kme_port must be"),
    ('[[sites]]\nname = "a"\nnode = "yes"\n', "node must be true or false"),
    ('[cluster]\nk = 2\n[[sites]]\nname = "a"\nkme_port = 4000\n[[sites]]\nname = "b"\nnode_port = 4000\n',
     "node_port 4000 is already a.kme_port"),
    ('[[sites]]\nname = "a"\nname = "b"\n', "line 3"),
])
def test_bad_cluster_files_name_the_place(tmp_path, capsys, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        Network.from_toml(path)
    assert main(["cluster", "up", str(path), "--state", str(tmp_path / "state"), "--no-nodes"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qstore: ") and str(path) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "state" / "cluster.json").exists()


def test_a_kme_config_comes_from_the_file_the_links_and_the_seeds(tmp_path):
    net = Network.from_toml(LOCAL)
    links = deploy.link_states(net, epoch=1000.0)
    seeds = deploy.Seeds.new(net)
    assert deploy.Seeds.from_json(json.loads(json.dumps(seeds.to_json()))) == seeds
    assert seeds.links[frozenset(("site1", "site2"))].hex() not in repr(seeds)
    urls = {f"kme.{s.name}": f"https://127.0.0.1:{4000 + i}" for i, s in enumerate(net.sites)}
    files = {"cert": tmp_path / "c.pem", "key": tmp_path / "c.key", "ca": tmp_path / "ca.pem"}
    one = deploy.kme_config(net, "site1", links=links, seeds=seeds, kme_urls=urls, **files)
    assert one.kme_id == "kme.site1" and one.saes == {"node.site1"}
    assert one.directory["client"] == one.directory["gateway"] == "kme.client"
    assert {lk.peer for lk in one.links} == {"kme.client", "kme.site2", "kme.site5"}
    assert all(lk.epoch == 1000.0 and lk.rate_bps == float("inf") for lk in one.links)
    assert set(one.routes) == {"kme.site3", "kme.site4"} and "kme.site1" not in one.peers
    desk = deploy.kme_config(net, "client", links=links, seeds=seeds, kme_urls=urls, **files)
    assert desk.saes == {"client", "gateway", "hospital-a", "hospital-b", "hospital-c", "analyst"}
    assert not desk.routes and len(desk.links) == 5
    # both ends of a link get the same seed
    other = deploy.kme_config(net, "site2", links=links, seeds=seeds, kme_urls=urls, **files)
    seed_of = {lk.peer: lk.seed for lk in one.links}
    assert seed_of["kme.site2"] == {lk.peer: lk.seed for lk in other.links}["kme.site1"]
    with pytest.raises(ConfigError, match="no link site1-site2"):
        deploy.kme_config(net, "site1", links=links[:5], seeds=seeds, kme_urls=urls, **files)
    with pytest.raises(ConfigError, match="no site 'nowhere'"):
        deploy.kme_config(net, "nowhere", links=links, seeds=seeds, kme_urls=urls, **files)


def test_a_new_run_reuses_the_ca_certificates_and_node_data_but_not_the_ports(tmp_path):
    net = Network.from_toml(LOCAL)
    first = cluster.plan(net, LOCAL, tmp_path, nodes=True, epoch=1.0)
    (first.nodes[2].data / "kept").write_text("shares")
    files = {p: p.read_bytes() for p in [first.ca, *(tmp_path / "certs").iterdir()]}
    second = cluster.plan(net, LOCAL, tmp_path, nodes=True, epoch=2.0)
    assert {p: p.read_bytes() for p in files} == files
    assert (second.nodes[2].data / "kept").read_text() == "shares"
    assert [(n.id, n.x) for n in second.nodes] == [(f"node.site{i}", i) for i in range(1, 6)]
    assert all(n.data == tmp_path / "nodes" / n.site and n.pid is None for n in second.nodes)
    urls = [p.url for p in (*second.kmes, *second.nodes)]
    assert len(set(urls)) == 11 and second.extra["links"][0]["epoch"] == 2.0
    damaged = tmp_path / "certs" / "node.site1.pem"
    damaged.write_text("garbage")  # issued again
    cluster.plan(net, LOCAL, tmp_path, nodes=False, epoch=3.0)
    assert damaged.read_bytes() not in (b"garbage", files[damaged])


# -- the default cluster as processes --------------------------------------------------------


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster") / "state"
    done = cli("cluster", "up", "--state", root, "--no-nodes", "--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    state = ClusterState.load(root)
    yield state, printed
    result = cluster.down(root)
    assert len(result.stopped) == len(state.kmes)
    assert all(gone(k.pid, root) for k in state.kmes)


def test_up_writes_the_state_beside_the_certificates(local):
    state, printed = local
    root = state.directory
    assert printed["state"] == str(root) and printed["kmes"] == state.to_json()["kmes"]
    assert [k.site for k in state.kmes] == ["site1", "site2", "site3", "site4", "site5", "client"]
    assert all(k.url.startswith("https://127.0.0.1:") and k.pid for k in state.kmes)
    expected = ["client", "gateway", "analyst", "hospital-a", "hospital-b", "hospital-c"]
    assert sorted(s.id for s in state.saes) == sorted(expected + [f"node.site{i}" for i in range(1, 6)])
    assert all(s.cert.parent == root / "certs" and s.cert.exists() and s.key.exists() for s in state.saes)
    assert state.ca == root / "ca" / "ca.pem" and state.k == 3 and state.n == 5
    assert len(state.extra["links"]) == 10 and all(lk["epoch"] > 0 for lk in state.extra["links"])
    secrets = root / "secrets.json"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    seed = json.loads(secrets.read_text())["links"][0]["seed"]
    for path in [root / "cluster.json", *(root / "logs").iterdir()]:
        assert seed not in path.read_text()


def test_status_shows_every_process_and_both_directions_of_every_link(local):
    state, _ = local
    report = cluster.status(state.directory)
    assert cluster.healthy(report)
    assert [(p["id"], p["alive"], p["health"]) for p in report["processes"]] == \
        [(k.id, True, "ok") for k in state.kmes]
    assert len(report["links"]) == 10
    for lk in report["links"]:
        for direction in (f"{lk['a']}->{lk['b']}", f"{lk['b']}->{lk['a']}"):
            assert lk[direction]["available_bits"] == lk["capacity_bits"] == 2**33
    done = cli("cluster", "status", "--state", state.directory)
    assert done.returncode == 0 and "kme.site5" in done.stdout and "site4-site5" in done.stdout


def test_saes_of_the_state_get_the_same_keys_at_both_ends(local):
    state, _ = local
    asyncio.run(exchange(state, "node.site1", "node.site2"))  # a direct link
    asyncio.run(exchange(state, "node.site1", "node.site3"))  # relayed through a trusted KME
    asyncio.run(exchange(state, "client", "node.site4", number=4, size=8192))
    asyncio.run(exchange(state, "node.site4", "gateway"))
    report = cluster.status(state.directory)
    link = next(lk for lk in report["links"] if (lk["a"], lk["b"]) == ("client", "site4"))
    assert link["client->site4"]["delivered_bits"] == 4 * 8192
    assert link["site4->client"]["delivered_bits"] == 2 * 256
    # the KMEs' own counters (their /metrics) agree: the client's KME handed out 4 keys of 1 KiB
    figures = {p["id"]: p["figures"] for p in report["processes"]}
    assert figures["kme.client"]["key_delivered_bytes"] >= 4 * 1024 and figures["kme.client"]["errors"] == 0


def test_a_second_up_is_refused_while_it_runs(local, capsys):
    state, _ = local
    assert main(["cluster", "up", "--state", str(state.directory), "--no-nodes"]) == 1
    err = capsys.readouterr().err
    assert "already running" in err and "qstore cluster down" in err
    assert ClusterState.load(state.directory).kmes == state.kmes


# -- a small cluster, a KME by hand, failures --------------------------------------------------


def test_kme_serve_by_hand_then_down_twice(tmp_path, capsys):
    config, root = tmp_path / "small.toml", tmp_path / "state"
    config.write_text(SMALL)
    # the stale state of a cluster that died: cleared, not refused
    dead = subprocess.Popen(["true"])
    dead.wait()
    root.mkdir()
    (root / "cluster.json").write_text(json.dumps({
        "format": 1, "name": "small", "k": 2, "n": 2, "ca": "/nowhere/ca.pem",
        "kmes": [{"id": "kme.a", "site": "a", "url": "https://127.0.0.1:1", "pid": dead.pid}]}))
    assert main(["cluster", "up", str(config), "--state", str(root), "--no-nodes"]) == 0
    out = capsys.readouterr().out
    assert "desk" in out and str(root) in out
    state = ClusterState.load(root)
    assert [k.site for k in state.kmes] == ["a", "b", "desk"]
    assert state.extra["links"][1]["rate_bps"] == 1e6

    # stop b's KME, then run it by hand on the same port: a and desk reach it again
    b = state.kme("b")
    os.kill(b.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not gone(b.pid, root) and time.monotonic() < deadline:
        time.sleep(0.05)
    log = (tmp_path / "b.log").open("wb")
    hand = subprocess.Popen([sys.executable, "-m", "client.cli", "kme", "serve", str(config), "--site", "b",
                             "--state", str(root)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while (report := cluster.status(root))["processes"][1]["health"] != "ok":
            assert hand.poll() is None and time.monotonic() < deadline, (tmp_path / "b.log").read_text()
            time.sleep(0.1)
        # cluster.json still names the pid `cluster up` started: gone, so not healthy as a whole
        assert report["processes"][1]["alive"] is False and not cluster.healthy(report)
        asyncio.run(exchange(state, "node.a", "node.b"))
        asyncio.run(exchange(state, "client", "node.a"))  # desk → b → a: relayed through the hand-run KME
    finally:
        hand.send_signal(signal.SIGTERM)
        assert hand.wait(timeout=10) == 0  # a clean exit on SIGTERM
        log.close()

    first = cluster.down(root)
    assert first.was_running and set(first.stopped) == {"kme.a", "kme.desk"}
    assert all(gone(k.pid, root) for k in state.kmes)
    assert not (root / "cluster.json").exists() and not (root / "secrets.json").exists()
    assert (root / "ca" / "ca.pem").exists() and (root / "certs" / "node.a.pem").exists()
    again = cluster.down(root)
    assert not again.was_running and again.stopped == ()
    assert main(["cluster", "down", "--state", str(root)]) == 0
    assert "no cluster" in capsys.readouterr().out
    with pytest.raises(cluster.ClusterStateError, match="cluster up"):
        cluster.status(root)


def test_a_process_that_cannot_start_stops_everything_and_shows_its_log(tmp_path, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    config, root = tmp_path / "two.toml", tmp_path / "state"
    config.write_text(f'[cluster]\nk = 2\n[[sites]]\nname = "a"\n[[sites]]\nname = "b"\nkme_port = {port}\n'
                      '[[links]]\na = "a"\nb = "b"\nrate = "unlimited"\n')
    try:
        assert main(["cluster", "up", str(config), "--state", str(root), "--no-nodes"]) == 1
    finally:
        busy.close()
    err = capsys.readouterr().err
    assert "kme kme.b exited" in err and "kme.b.log" in err and "  | " in err
    assert not (root / "cluster.json").exists() and not (root / "secrets.json").exists()
    ours = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if cluster.is_ours(pid, root)]
    assert ours == []
