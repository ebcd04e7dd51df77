"""Network topology, relay routing and pool simulation (rates injected: no physics here)."""

import math
from pathlib import Path

import pytest

from qkd_sim.network import ConfigError, Link, Network, Site, simulate

DEPLOY = Path(__file__).parent.parent / "deploy"


def fixed(rates):
    return lambda link: rates.get(link.name, link.rate_bps if link.rate_bps is not None else 1000.0)


def diamond(rates):
    sites = [Site(name=n) for n in "abcd"]
    links = [Link(a="a", b="b", rate_bps=1), Link(a="b", b="d", rate_bps=1),
             Link(a="a", b="c", rate_bps=1), Link(a="c", b="d", rate_bps=1)]
    return Network.build("d", 2, sites, links, fixed(rates))


def test_widest_path_and_route_rate():
    net = diamond({"a-b": 100, "b-d": 5, "a-c": 50, "c-d": 40})
    assert net.route("a", "d") == ["a", "c", "d"]
    assert net.route_rate(["a", "c", "d"]) == 40
    assert net.route("a", "b") == ["a", "b"]
    assert net.route("d", "a") == ["d", "c", "a"]
    assert net.route("a", "a") == ["a"]


def test_ties_prefer_fewer_hops():
    sites = [Site(name=n) for n in "abc"]
    links = [Link(a="a", b="b", rate_bps=10), Link(a="b", b="c", rate_bps=10),
             Link(a="a", b="c", rate_bps=10)]
    net = Network.build("t", 2, sites, links, fixed({}))
    assert net.route("a", "c") == ["a", "c"]


def test_no_route_is_a_clear_error():
    net = Network.build("x", 2, [Site(name="a"), Site(name="b")], [], fixed({}))
    with pytest.raises(ConfigError, match="no chain of QKD links"):
        net.route("a", "b")


@pytest.mark.parametrize("doc,needle", [
    ({"sites": []}, "no \\[\\[sites\\]\\]"),
    ({"sites": [{"name": "a"}, {"name": "a"}]}, "same name"),
    ({"sites": [{"name": "a"}], "links": [{"a": "a", "b": "z", "rate": "unlimited"}]}, "unknown site"),
    ({"sites": [{"name": "a"}, {"name": "b"}], "links": [{"a": "a", "b": "b"}]}, "protocol"),
    ({"sites": [{"name": "a"}, {"name": "b"}], "links": [{"a": "a", "b": "b", "rate": "fast"}]}, "unlimited"),
    ({"sites": [{"name": "a"}, {"name": "b"}], "links": [{"a": "a", "b": "b", "rate": "unlimited",
                                                          "colour": "red"}]}, "unknown key"),
    ({"sites": [{"name": "a", "port": 1}]}, "unknown key"),
    ({"cluster": {"k": 1}, "sites": [{"name": "a"}, {"name": "b"}]}, "k must"),
    ({"sites": [{"name": "a b"}]}, "site name"),
])
def test_bad_configs(doc, needle):
    with pytest.raises(ConfigError, match=needle):
        Network.from_dict(doc, fixed({}))


def test_local_config_is_fully_reachable_and_unlimited():
    net = Network.from_toml(DEPLOY / "local.toml")
    assert net.name == "local" and net.k == 3
    assert len(net.sites) == 6
    assert all(math.isinf(r) for r in net.rates.values())
    for site in ("site1", "site2", "site3", "site4", "site5"):
        assert net.route("client", site) == ["client", site]
    assert len(net.route("site1", "site3")) == 3  # relayed through one trusted node


def test_tokyo_config_relays_koganei_through_otemachi():
    net = Network.from_toml(DEPLOY / "tokyo.toml", fixed({}))
    assert net.route("koganei", "hongo") == ["koganei", "otemachi", "hongo"]
    assert net.link("koganei", "otemachi").length_km == 45


def test_simulate_fills_drains_and_reports_starvation():
    sites = [Site(name=n) for n in "abc"]
    links = [Link(a="a", b="b", rate_bps=100, capacity_bits=10_000), Link(a="b", b="c", rate_bps=10)]
    net = Network.build("s", 2, sites, links, fixed({}))
    trace = simulate(net, hours=1, step_s=60)
    assert trace.levels["a-b"][0] == 0 and trace.levels["a-b"][-1] == 10_000  # capped
    assert trace.levels["b-c"][-1] == pytest.approx(36_000)
    # a->c relays over both hops: b-c (10 b/s) cannot carry 50 b/s of demand
    trace = simulate(net, hours=1, step_s=60, demand_bps={"a-c": 50})
    assert trace.starved["b-c"] > 0 and trace.levels["b-c"][-1] == 0
    assert trace.starved["a-b"] == 0
    assert len(trace.times_s) == 61
    with pytest.raises(ConfigError):
        simulate(net, hours=0)


def test_a_mesh_cluster_file_joins_every_pair_of_sites():
    import tomllib

    from qkd_sim.network import mesh_toml

    net = Network.from_dict(tomllib.loads(mesh_toml("m", 2, ["a", "b", "c"], client_saes=["h1", "an"])))
    assert net.n == 3 and net.k == 2 and net.client_site.name == "client"
    assert net.client_site.saes == ("h1", "an") and len(net.links) == 6
    assert all(link.rate_bps == float("inf") for link in net.links)


def _with_gateway_port(port: object, host_b: str = "10.0.0.2") -> dict:
    return {"cluster": {"k": 2, "gateway_port": port},
            "sites": [{"name": "desk", "node": False, "host": "10.0.0.1", "kme_port": 7000},
                      {"name": "a", "host": "10.0.0.1", "kme_port": 7001, "node_port": 9000},
                      {"name": "b", "host": host_b, "kme_port": 7002, "node_port": 7003}],
            "links": [{"a": "desk", "b": "a", "rate": "unlimited"},
                      {"a": "a", "b": "b", "rate": "unlimited"}]}


def test_the_gateway_port_in_the_cluster_file():
    assert Network.from_dict(_with_gateway_port(9100)).gateway_port == 9100
    assert Network.from_dict({**_with_gateway_port(1), "cluster": {"k": 2}}).gateway_port is None
    # the gateway listens on the client site's host: another process there may not have that port
    with pytest.raises(ConfigError, match=r"gateway_port 9000 is already a.node_port"):
        Network.from_dict(_with_gateway_port(9000))
    with pytest.raises(ConfigError, match=r"gateway_port 7001 is already a.kme_port"):
        Network.from_dict(_with_gateway_port(7001))
    assert Network.from_dict(_with_gateway_port(9100, host_b="10.0.0.1")).gateway_port == 9100
    for bad in (0, 65536, "9000", True, 90.0):
        with pytest.raises(ConfigError, match="gateway_port must be an integer from 1 to 65535"):
            Network.from_dict(_with_gateway_port(bad))
