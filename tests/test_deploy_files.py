"""Packaging for sites (deploy/docker, deploy/k8s, deploy/systemd) parses and agrees with the cluster file.

No docker, kubectl or systemd needed: every YAML file parses, the cluster
files parse as :class:`qkd_sim.network.Network`, every `qstore` and
`qstore-site` command line in them parses with the real argument parsers,
and names, ports, volumes and state paths agree across the files.
"""

from __future__ import annotations

import configparser
import importlib.machinery
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from client.cli import build_parser
from qkd_sim.network import Network

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
SYSTEMD = ROOT / "deploy" / "systemd"
CLUSTER = DOCKER / "cluster.toml"
IMAGE_CONFIG = "/etc/qstore/cluster.toml"  # where the Dockerfile puts deploy/docker/cluster.toml
GATEWAY = ("gateway", 9000)


def _helper():
    loader = importlib.machinery.SourceFileLoader("qstore_site", str(DOCKER / "qstore-site"))
    spec = importlib.util.spec_from_loader("qstore_site", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


HELPER = _helper()
NET = Network.from_toml(CLUSTER)


def _compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def _k8s_docs() -> list[dict]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def _commands(script: str) -> list[list[str]]:
    """The `qstore ...` and `qstore-site ...` command lines of a shell script (as `sh -ec` runs it)."""
    out = []
    for line in re.split(r"\n|&&|\|\|", script.replace("$$", "$")):
        words = shlex.split(line.replace("exec ", "", 1).strip()) if line.strip() else []
        if words and words[0] in ("qstore", "qstore-site"):
            out.append(words)
    return out


def _run(entry: list[str], args: list) -> list[list[str]]:
    if entry in (["sh", "-ec"], ["sh", "-c"]):
        return _commands(args[0])
    return [[*entry, *map(str, args)]]


def _container_commands(spec: dict) -> list[list[str]]:
    """What a compose service runs (its command goes to the image's entrypoint, `qstore`)."""
    return _run(spec.get("entrypoint", ["qstore"]), spec.get("command", []))


def _pod_commands(container: dict) -> list[list[str]]:
    """What a Kubernetes container runs (command replaces the image's entrypoint, `qstore`; args follow)."""
    return _run(container.get("command", ["qstore"]), container.get("args", []))


def _check_parses(cmd: list[str]) -> object:
    """Parse a command line with the real parser (qstore's or the helper's); returns the namespace."""
    parser = build_parser() if cmd[0] == "qstore" else HELPER.build_parser()
    try:
        return parser.parse_args(cmd[1:])
    except SystemExit:
        pytest.fail(f"not a valid command line: {shlex.join(cmd)}")


def _served(commands: list[list[str]]) -> list[tuple[str, object]]:
    """(role, namespace) of the `qstore kme|node|s3 serve` commands among ``commands``."""
    out = []
    for cmd in commands:
        args = _check_parses(cmd)
        if cmd[0] == "qstore" and cmd[1:2] in (["kme"], ["node"], ["s3"]) and cmd[2:3] == ["serve"]:
            out.append((cmd[1], args))
    return out


# -- the cluster file -----------------------------------------------------------------------------


def test_docker_cluster_file_is_local_toml_with_fixed_ports_and_service_hosts():
    local = Network.from_toml(ROOT / "deploy" / "local.toml")
    assert [s.name for s in NET.sites] == [s.name for s in local.sites]
    assert [(s.node, s.saes) for s in NET.sites] == [(s.node, s.saes) for s in local.sites]
    assert {lk.name for lk in NET.links} == {lk.name for lk in local.links}
    assert (NET.k, NET.n) == (local.k, local.n) == (3, 5)
    for site in NET.sites:
        assert site.host == site.name
        assert site.kme_port and (site.node_port or not site.node), site


def test_every_toml_and_yaml_parses():
    for path in ROOT.glob("deploy/**/*.toml"):
        Network.from_toml(path)
    files = [*DOCKER.glob("*.yml"), *K8S.rglob("*.yaml")]
    assert len(files) >= 5
    for path in files:
        assert [d for d in yaml.safe_load_all(path.read_text()) if d], path


# -- the image --------------------------------------------------------------------------------


def test_dockerfile_entrypoint_is_the_qstore_console_script():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    entry = re.findall(r"^ENTRYPOINT (.+)$", text, re.M)
    assert len(entry) == 1 and json.loads(entry[0]) == ["qstore"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["qstore"] == "client.cli:main"
    assert re.search(r"^RUN pip install \.", text, re.M)
    for src, dst in (("deploy/docker/qstore-site", "/usr/local/bin/qstore-site"),
                     ("deploy/docker/cluster.toml", IMAGE_CONFIG)):
        assert f"COPY {src} {dst}" in text
    # the build context (the repository root) lets in what the Dockerfile copies
    allowed = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert f"!{copied}" in allowed or f"!{copied}/" in allowed, copied
    assert re.search(r"^USER qstore$", text, re.M)


# -- docker compose ---------------------------------------------------------------------------


def test_compose_services_match_the_cluster_file():
    compose = _compose()
    services = compose["services"]
    state = "/var/lib/qstore"
    node_services = {f"{s.name}-node" for s in NET.node_sites}
    assert set(services) == {s.host for s in NET.sites} | node_services | {"init", GATEWAY[0]}
    for site in NET.sites:
        kme = services[site.host]
        served = _served(_container_commands(kme))
        assert [(role, a.site, str(a.state), str(a.config)) for role, a in served] == [
            ("kme", site.name, state, IMAGE_CONFIG)]
        claims = [c for c in _container_commands(kme) if c[:2] == ["qstore-site", "claim"]]
        assert claims and _check_parses(claims[0]).site == site.name  # refuses a second start
        assert kme["restart"] == "no"
        exposed = {int(p) for p in kme["expose"]}
        assert exposed == {site.kme_port} | ({site.node_port} if site.node else set())
        assert f"state:{state}" in kme["volumes"]
        assert kme.get("hostname", site.host) == site.host
        if not site.node:
            continue
        node = services[f"{site.name}-node"]
        # the node listens on the site's address, which is the KME service's network namespace
        assert node["network_mode"] == f"service:{site.host}"
        assert "expose" not in node and "ports" not in node
        [(role, args)] = _served(_container_commands(node))
        assert (role, args.site, str(args.state)) == ("node", site.name, state)
        assert f"state:{state}" in node["volumes"]
        assert f"{site.name}-data:{state}/nodes/{site.name}" in node["volumes"]
        assert f"{site.name}-data" in compose["volumes"]
        assert f"{site.name}-data:{state}/nodes/{site.name}" in services["init"]["volumes"]  # chowned there
    assert set(compose["volumes"]) == {"state"} | {f"{s.name}-data" for s in NET.node_sites}


def test_compose_init_and_gateway():
    services = _compose()["services"]
    init = _container_commands(services["init"])
    assert ["qstore", "ca", "init", "--state", "$S"] in init
    steps = [(c[0], c[1]) for c in init]
    assert steps.index(("qstore-site", "secrets")) < steps.index(("qstore-site", "plan"))
    [plan] = [_check_parses([w.replace("$C", IMAGE_CONFIG) for w in c]) for c in init if c[1] == "plan"]
    assert plan.gateway == f"{GATEWAY[0]}:{GATEWAY[1]}" and plan.site is None
    for cmd in init:
        _check_parses(cmd)
    for name, spec in services.items():
        if name != "init":
            assert spec["depends_on"], name
    gw = services[GATEWAY[0]]
    [(role, args)] = _served(_container_commands(gw))
    assert (role, args.host, args.port, str(args.state)) == ("s3", "0.0.0.0", GATEWAY[1], "/var/lib/qstore")
    assert str(GATEWAY[1]) in gw["expose"] and any(p.endswith(f":{GATEWAY[1]}") for p in gw["ports"])


# -- Kubernetes -------------------------------------------------------------------------------


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _k8s_docs() if d["kind"] == kind}


def test_k8s_configmap_holds_the_cluster_file():
    [cm] = _by_kind("ConfigMap").values()
    text = cm["data"]["cluster.toml"]
    assert tomllib.loads(text) == tomllib.loads(CLUSTER.read_text())
    assert Network.from_dict(tomllib.loads(text)).sites == NET.sites
    assert all(d["metadata"]["namespace"] == "qstore" for d in _k8s_docs() if d["kind"] != "Namespace")


def test_k8s_services_and_statefulsets_match_the_cluster_file():
    services, sets = _by_kind("Service"), _by_kind("StatefulSet")
    assert set(sets) == {s.name for s in NET.sites}
    for site in NET.sites:
        svc = services[site.host]
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
        want = {"kme": site.kme_port} | ({"node": site.node_port} if site.node else {})
        assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == want
        assert all(p["targetPort"] == p["name"] for p in svc["spec"]["ports"])
        sts = sets[site.name]
        assert sts["spec"]["serviceName"] == site.host and sts["spec"]["replicas"] == 1
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod = sts["spec"]["template"]["spec"]
        claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
        containers = {c["name"]: c for c in pod["containers"]}
        assert set(containers) == {"kme"} | ({"node"} if site.node else set())
        for role, container in containers.items():
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports == {role: want[role]}
            [(served, args)] = _served(_pod_commands(container))
            assert (served, args.site) == (role, site.name)
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            # the state directory the command uses is the persistent volume
            assert mounts[str(args.state)] in claims
            if role == "kme":
                assert str(args.config) == IMAGE_CONFIG and mounts["/etc/qstore"] == "cluster"
        [prepare] = pod["initContainers"]
        plans = [c for c in _pod_commands(prepare) if c[:2] == ["qstore-site", "plan"]]
        [plan] = [_check_parses([w.replace("$S", "/var/lib/qstore") for w in c]) for c in plans]
        assert plan.site == site.name and plan.gateway == f"{GATEWAY[0]}:{GATEWAY[1]}"
        assert {m["mountPath"]: m["name"] for m in prepare["volumeMounts"]}[str(plan.state)] in claims
        script = prepare["args"][0]
        for cert in [f"kme.{site.name}"] + ([f"node.{site.name}"] if site.node else []):
            assert f"/secrets/{cert}.pem" in script and f"/secrets/{cert}.key" in script
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["certs"]["secret"]["secretName"] == f"qstore-{site.name}"
        assert volumes["cluster"]["configMap"]["name"] == "qstore-cluster"


def test_k8s_gateway():
    svc, dep = _by_kind("Service")[GATEWAY[0]], _by_kind("Deployment")[GATEWAY[0]]
    [port] = svc["spec"]["ports"]
    pod = dep["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [(role, args)] = _served(_pod_commands(container))
    assert (role, args.port, port["port"]) == ("s3", GATEWAY[1], GATEWAY[1])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {port["targetPort"]: GATEWAY[1]}
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    [prepare] = pod["initContainers"]
    [plan] = [_check_parses(c) for c in _pod_commands(prepare) if c[1] == "plan"]
    assert plan.gateway_only and plan.gateway == f"{GATEWAY[0]}:{GATEWAY[1]}"


def test_k8s_secret_template_names_every_file_the_pods_copy():
    secrets = [d for d in yaml.safe_load_all((K8S / "templates" / "secret.yaml").read_text()) if d]
    assert {d["kind"] for d in secrets} == {"Secret"}
    site1 = next(d for d in secrets if d["metadata"]["name"] == "qstore-site1")
    pod = _by_kind("StatefulSet")["site1"]["spec"]["template"]["spec"]
    copied = set(re.findall(r"/secrets/([\w.]+)", pod["initContainers"][0]["args"][0]))
    assert copied == set(site1["stringData"])


def test_k8s_nodes_take_object_store_credentials_from_an_optional_secret():
    with_node = 0
    for site, sts in _by_kind("StatefulSet").items():
        containers = sts["spec"]["template"]["spec"]["containers"]
        for c in containers:
            if c["name"] == "node":
                with_node += 1
                assert c["envFrom"] == [{"secretRef": {"name": f"qstore-{site}-storage", "optional": True}}]
            else:
                assert "envFrom" not in c  # only the node talks to the object store
    assert with_node == len(Network.from_toml(CLUSTER).node_sites)


# -- systemd ----------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    lines = (SYSTEMD / "qstore.env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {k: v for k, v in pairs}


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string((SYSTEMD / name).read_text())
    return cp


def _expand(line: str, env: dict[str, str], instance: str) -> list[str]:
    line = line.replace("%i", instance)
    line = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], line)
    words = []
    for word in shlex.split(line):  # an unbraced $VAR splits into words (systemd's rule)
        words += env[word[1:]].split() if word.startswith("$") else [word]
    return words


@pytest.mark.parametrize("unit, role", [("qstore-kme@.service", "kme"), ("qstore-node@.service", "node"),
                                        ("qstore-gateway.service", "s3")])
def test_systemd_units(unit, role):
    env = {**_env(), "QSTORE_CONFIG": str(CLUSTER), "QSTORE_PLAN_OPTS": "--with-gateway"}
    cp = _unit(unit)
    assert {"Unit", "Service", "Install"} <= set(cp.sections())
    service = cp["Service"]
    assert service["Type"] == "exec" and service["User"] == "qstore"
    env_files = [line.split("=", 1)[1] for line in (SYSTEMD / unit).read_text().splitlines()
                 if line.startswith("EnvironmentFile=")]
    # a node's object-store credentials ([sites.storage] backend "s3") in an optional file of its own
    storage = ["-/etc/qstore/storage-%i.env"] if role == "node" else []
    assert env_files == ["/etc/qstore/qstore.env", *storage]
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert env["QSTORE_HOME"] in service["ReadWritePaths"].split()
    assert service["StateDirectory"] == Path(env["QSTORE_HOME"]).name
    assert service["Restart"] == ("no" if role == "kme" else "on-failure")
    exec_start = _expand(service["ExecStart"], env, "site1")
    assert Path(exec_start[0]).name == "qstore"
    [(served, args)] = _served([["qstore", *exec_start[1:]]])
    assert served == role and str(args.state) == env["QSTORE_HOME"]
    if role != "s3":
        assert args.site == "site1"
    else:
        assert f"{args.host}:{args.port}" == env["QSTORE_GATEWAY"]
    # ExecStartPre: the helper, by the venv's python (its shebang's python may not be the venv's)
    content = (SYSTEMD / unit).read_text()
    pres = [_expand(line.split("=", 1)[1], env, "site1") for line in content.splitlines()
            if line.startswith("ExecStartPre=")]
    for pre in pres:
        assert Path(pre[0]).name == "python" and Path(pre[1]).name == "qstore-site"
        _check_parses(["qstore-site", *pre[2:]])
    assert [p[2] for p in pres] == {"kme": ["plan", "claim"], "node": [], "s3": ["plan"]}[role]
    assert cp["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_node_follows_its_kme():
    unit = _unit("qstore-node@.service")["Unit"]
    assert unit["Requires"] == "qstore-kme@%i.service" and "qstore-kme@%i.service" in unit["After"]


# -- the helper ---------------------------------------------------------------------------------


def test_helper_writes_the_cluster_state_the_serve_commands_read(tmp_path):
    from client import cluster
    from qstore.cluster import ClusterState

    state = tmp_path / "state"
    cluster.ca_init(state)
    assert HELPER.main(["secrets", str(CLUSTER), "--state", str(state)]) == 0
    first = (state / "secrets.json").read_bytes()
    assert HELPER.main(["secrets", str(CLUSTER), "--state", str(state)]) == 0  # unused: kept
    assert (state / "secrets.json").read_bytes() == first
    assert HELPER.main(["plan", str(CLUSTER), "--state", str(state), "--gateway", "gateway:9000"]) == 0
    got = ClusterState.load(state)
    urls = {k.site: k.url for k in got.kmes} | {f"{n.site}-node": n.url for n in got.nodes}
    for site in NET.sites:
        assert urls[site.name] == f"https://{site.host}:{site.kme_port}"
        if site.node:
            assert urls[f"{site.name}-node"] == f"https://{site.host}:{site.node_port}"
    gw = cluster.gateway_of(got)
    assert gw["url"] == "http://gateway:9000" and Path(gw["credentials"]).exists()
    keys = gw["access_key"]
    assert HELPER.main(["plan", str(CLUSTER), "--state", str(state), "--gateway", "gateway:9000"]) == 0
    assert cluster.gateway_of(ClusterState.load(state))["access_key"] == keys  # users kept
    # a KME starts once per secrets: the second claim is refused, and init then draws new secrets
    assert HELPER.main(["claim", str(CLUSTER), "--state", str(state), "--site", "site1"]) == 0
    assert HELPER.main(["claim", str(CLUSTER), "--state", str(state), "--site", "site1"]) == 1
    assert HELPER.main(["claim", str(CLUSTER), "--state", str(state), "--site", "site2"]) == 0
    assert HELPER.main(["secrets", str(CLUSTER), "--state", str(state)]) == 0
    assert (state / "secrets.json").read_bytes() != first
    assert HELPER.main(["claim", str(CLUSTER), "--state", str(state), "--site", "site1"]) == 0


def test_helper_at_a_site_without_the_ca_key(tmp_path):
    admin, site = tmp_path / "admin", tmp_path / "site1"
    from client import cluster

    cluster.ca_init(admin)
    assert HELPER.main(["secrets", str(CLUSTER), "--state", str(admin)]) == 0
    (site / "ca").mkdir(parents=True)
    (site / "ca" / "ca.pem").write_bytes((admin / "ca" / "ca.pem").read_bytes())
    (site / "secrets.json").write_bytes((admin / "secrets.json").read_bytes())
    plan = ["plan", str(CLUSTER), "--state", str(site), "--site", "site1", "--gateway", "gateway:9000"]
    assert HELPER.main(plan) == 1  # no certificates yet, and no CA key to issue them
    for name in ("kme.site1", "node.site1"):
        cluster.ca_issue(admin, name, hosts=["site1"], out=site / "certs")
    assert HELPER.main(plan) == 0
    assert not (site / "gateway").exists()  # the gateway runs elsewhere
