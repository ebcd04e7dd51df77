"""Statistics on secret-shared tables against a real cluster of processes (KMEs and nodes on 127.0.0.1).

One cluster for the module: four storage sites (k = 2, so t = 1 and MPC needs
3 of the 4 nodes), a client site with three hospitals and an analyst as
SAEs, every pair of sites joined by an unlimited-rate QKD link. Every
operation is checked against numpy/scipy on the same data.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sst

from client import cluster
from client.storage import QStore
from qkd_sim.network import mesh_toml
from qstore.cluster import ClusterState

ROOT = Path(__file__).resolve().parent.parent
SITES = ("s1", "s2", "s3", "s4")
OWNERS = ("hospital-a", "hospital-b", "hospital-c")
ROWS = 1500

SCHEMA = """
[table]
min_group_size = 10
[columns]
age    = { type = "integer", min = 0, max = 120 }
sex    = { type = "categorical", values = ["M", "F"] }
smoker = { type = "boolean" }
height = { type = "fixed", decimals = 1, min = 100, max = 230 }
weight = { type = "fixed", decimals = 1, min = 20, max = 250 }
"""


def _config() -> str:
    return mesh_toml("stats", 2, SITES, client_saes=(*OWNERS, "analyst"))


def make_data(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sex = rng.choice(["M", "F"], rows)
    height = np.round(rng.normal(np.where(sex == "M", 176, 163), 7), 1).clip(100, 230)
    noise = rng.normal(0, 9, rows) + np.where(sex == "M", 4, 0)
    weight = np.round(0.9 * height - 80 + noise, 1).clip(20, 250)
    return {"age": rng.integers(18, 95, rows), "sex": sex, "smoker": rng.random(rows) < 0.3,
            "height": height, "weight": weight}


def to_csv(d: dict[str, np.ndarray]) -> str:
    lines = ["age,sex,smoker,height,weight"]
    lines += [f"{a},{s},{'true' if m else 'false'},{h:.1f},{w:.1f}"
              for a, s, m, h, w in zip(*(d[c] for c in ("age", "sex", "smoker", "height", "weight")),
                                       strict=True)]
    return "\n".join(lines) + "\n"


def cli(state: Path, *args: object, sae: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if sae:
        env["QSTORE_SAE"] = sae
    return subprocess.run([sys.executable, "-m", "client.cli", *map(str, args), "--state", str(state)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert res.returncode != 0, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qstore: ") and "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


async def _api(state: Path, sae: str, go):
    async with QStore(ClusterState.load(state), sae_id=sae, node_timeout_s=120) as qs:
        return await go(qs)


def api(state: Path, sae: str, go):
    return asyncio.run(_api(state, sae, go))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    config = root / "stats.toml"
    config.write_text(_config())
    state = root / "state"
    cluster.up(config, state, gateway=False)
    try:
        schema = root / "schema.toml"
        schema.write_text(SCHEMA)
        data = {}
        for i, owner in enumerate(OWNERS):
            d = make_data(ROWS if i == 0 else 200 + 100 * i, seed=i)
            data[owner] = d
            csv = root / f"{owner}.csv"
            csv.write_text(to_csv(d))
            res = cli(state, "table", "put", csv, "--name", f"patients_{owner[-1]}", "--schema", schema,
                      "--json", sae=owner)
            assert res.returncode == 0, res.stderr
            res = cli(state, "table", "grant", f"patients_{owner[-1]}", "analyst", sae=owner)
            assert res.returncode == 0, res.stderr
        yield state, data, root
    finally:
        cluster.down(state)


def test_tables_are_listed_described_and_refuse_bad_csv(world):
    state, _, root = world
    listed = json.loads(cli(state, "table", "ls", "--json").stdout)
    assert {t["name"]: (t["owner"], t["rows"]) for t in listed} == {
        "patients_a": ("hospital-a", ROWS), "patients_b": ("hospital-b", 300),
        "patients_c": ("hospital-c", 400)}
    desc = json.loads(cli(state, "table", "describe", "patients_a", "--json").stdout)
    assert desc["grants"] == ["analyst"] and [c["name"] for c in desc["schema"]["columns"]] == \
        ["age", "sex", "smoker", "height", "weight"]
    bad = root / "bad.csv"
    bad.write_text("age,sex,smoker,height,weight\n30,M,true,170.0,70.0\n31,X,false,160.0,60.0\n")
    err = one_line_error(cli(state, "table", "put", bad, "--name", "bad", "--schema", root / "schema.toml",
                             sae="hospital-a"), "line 3", "sex")
    assert "X" in err or "domain" in err or "value" in err
    missing = root / "missing.csv"
    missing.write_text("age,sex,height,weight\n30,M,170.0,70.0\n")
    one_line_error(cli(state, "table", "put", missing, "--name", "bad", "--schema", root / "schema.toml",
                       sae="hospital-a"), "smoker")
    assert "bad" not in {t["name"] for t in json.loads(cli(state, "table", "ls", "--json").stdout)}


def _approx(a, b, rel=1e-9):
    return a == pytest.approx(b, rel=rel, abs=1e-9)


def test_every_operation_matches_numpy_and_scipy(world):
    state, data, _ = world
    d = data["hospital-a"]
    w, h, age, male = d["weight"], d["height"], d["age"], d["sex"] == "M"

    async def go(qs):
        t = qs.table("patients_a")
        out = {
            "count": await t.count(), "sum": await t.sum("weight"), "mean": await t.mean("weight"),
            "var": await t.var("weight"), "std": await t.std("height"),
            "min": await t.min("weight"), "max": await t.max("weight"), "median": await t.median("weight"),
            "q90": await t.quantile("height", 0.9), "cov": await t.cov("height", "weight"),
            "corr": await t.corr("height", "weight"), "linreg": await t.linreg("weight", "height", "age"),
            "ttest1": await t.ttest("weight", mu=70), "welch": await t.group_by("sex").ttest("weight"),
            "chi2": await t.chi2("sex", "smoker"), "crosstab": await t.crosstab("sex", "smoker"),
            "hist": await t.histogram("age", bins=[18, 40, 60, 80, 95]),
            "fmean": await t.where(sex="M").mean("weight"),
            "fcount": await t.where("weight < 70.5 AND NOT smoker = true OR age >= 90").count(),
            "gmean": await t.group_by("sex").mean("weight"),
        }
        return out

    r = api(state, "analyst", go)
    assert r["count"].value == ROWS
    assert r["sum"].value == pytest.approx(w.sum(), abs=1e-6)
    assert _approx(r["mean"].value, w.mean())
    assert _approx(r["var"].value, w.var(ddof=1)) and _approx(r["std"].value, h.std(ddof=1))
    assert r["min"].value == pytest.approx(w.min()) and r["max"].value == pytest.approx(w.max())
    assert _approx(r["median"].value, np.median(w)) and _approx(r["q90"].value, np.quantile(h, 0.9))
    assert _approx(r["cov"].value, np.cov(h, w)[0, 1]) and _approx(r["corr"].value, np.corrcoef(h, w)[0, 1])
    fit = np.linalg.lstsq(np.column_stack([np.ones(ROWS), h, age]), w, rcond=None)[0]
    lin = r["linreg"].value
    assert _approx(lin["coef_intercept"], fit[0], 1e-7) and _approx(lin["coef_height"], fit[1], 1e-7)
    assert _approx(lin["coef_age"], fit[2], 1e-6)
    resid = w - np.column_stack([np.ones(ROWS), h, age]) @ fit
    assert _approx(lin["r2"], 1 - resid @ resid / ((w - w.mean()) @ (w - w.mean())), 1e-7)
    one = sst.ttest_1samp(w, 70)
    assert _approx(r["ttest1"].value["statistic"], one.statistic) and _approx(r["ttest1"].value["p_value"],
                                                                              one.pvalue, 1e-6)
    welch = sst.ttest_ind(w[male], w[~male], equal_var=False)
    assert _approx(r["welch"].value["statistic"], welch.statistic)
    assert _approx(r["welch"].value["p_value"], welch.pvalue, 1e-6)
    table = np.array([[np.sum((d["sex"] == s) & (d["smoker"] == b)) for b in (False, True)]
                      for s in ("M", "F")])
    chi = sst.chi2_contingency(table, correction=False)
    assert _approx(r["chi2"].value["statistic"], chi.statistic) and r["chi2"].value["dof"] == 1
    assert sorted(c.value for c in r["crosstab"]) == sorted(table.ravel().tolist())
    counts, _ = np.histogram(age, bins=[18, 40, 60, 80, 95])
    assert [b.value for b in r["hist"]] == counts.tolist()
    assert _approx(r["fmean"].value, w[male].mean()) and r["fmean"][0].rows == male.sum()
    want = ((w < 70.5) & ~d["smoker"]) | (age >= 90)
    assert r["fcount"].value == want.sum()
    assert {g.group["sex"]: g.value for g in r["gmean"]} == pytest.approx(
        {"M": w[male].mean(), "F": w[~male].mean()})
    assert all(res.report.key_spent_bytes > 0 for res in r.values())


def test_small_groups_are_suppressed_and_json_says_so(world):
    state, data, _ = world
    d = data["hospital-a"]
    cut = float(np.sort(d["weight"])[-5])  # five (or a few more, with ties) heaviest patients
    assert 0 < int(np.sum(d["weight"] >= cut)) < 10
    res = cli(state, "stats", "mean", "weight", "--table", "patients_a", "--where", f"weight >= {cut:.1f}",
              "--json", sae="analyst")
    assert res.returncode == 0, res.stderr
    (doc,) = [json.loads(line) for line in res.stdout.splitlines()]
    assert doc["suppressed"] is True and doc["value"] is None and doc["rows"] is None
    assert doc["op"] == "mean" and doc["column"] == "weight" and doc["group"] is None
    assert doc["key_spent_bytes"] > 0
    res = cli(state, "stats", "count", "--table", "patients_a", "--group-by", "sex", "--where", "age >= 90",
              "--json", sae="analyst")
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    for doc in docs:
        n = int(np.sum((d["age"] >= 90) & (d["sex"] == doc["group"]["sex"])))
        assert doc["suppressed"] == (n < 10) and doc["value"] == (None if n < 10 else n)


def test_union_of_three_owners_and_sql(world):
    state, data, _ = world
    w = np.concatenate([data[o]["weight"] for o in OWNERS])
    sex = np.concatenate([data[o]["sex"] for o in OWNERS])
    res = cli(state, "stats", "mean", "weight", "--table", "patients_a,patients_b,patients_c", "--json",
              sae="analyst")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["rows"] == len(w) and _approx(doc["value"], w.mean())
    res = cli(state, "sql", "SELECT sex, COUNT(*), AVG(weight) FROM patients_a GROUP BY sex", "--json",
              sae="analyst")
    assert res.returncode == 0, res.stderr
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    d = data["hospital-a"]
    for doc in docs:
        m = d["sex"] == doc["group"]["sex"]
        assert doc["value"] == (m.sum() if doc["op"] == "count" else pytest.approx(d["weight"][m].mean()))
    assert len(docs) == 4 and len(sex) == len(w)


def test_cli_options_and_sql_cover_the_other_operations(world):
    state, data, _ = world
    d = data["hospital-a"]
    w, h, age, smoker = d["weight"], d["height"], d["age"], d["smoker"]

    def docs(*args: object) -> list[dict]:
        res = cli(state, *args, "--json", sae="analyst")
        assert res.returncode == 0, res.stderr
        return [json.loads(line) for line in res.stdout.splitlines()]

    (q,) = docs("stats", "quantile", "height", "--table", "patients_a", "--q", "0.25")
    assert _approx(q["value"], np.quantile(h, 0.25))
    hist = docs("stats", "histogram", "weight", "--table", "patients_a", "--bins", "20,60,80,250")
    assert [b["value"] for b in hist] == np.histogram(w, bins=[20, 60, 80, 250])[0].tolist()
    (t1,) = docs("stats", "ttest", "height", "--table", "patients_a", "--mu", "170")
    assert _approx(t1["value"]["statistic"], sst.ttest_1samp(h, 170).statistic)
    cells = docs("stats", "crosstab", "sex", "smoker", "--table", "patients_a", "--where", "age < 60")
    young = age < 60
    assert {(c["group"]["sex"], c["group"]["smoker"]): c["value"] for c in cells} == {
        (s, str(b).lower()): int(np.sum(young & (d["sex"] == s) & (smoker == b)))
        for s in ("M", "F") for b in (False, True)}
    sql = docs("sql", "SELECT MEDIAN(weight), PERCENTILE_CONT(0.9) WITHIN GROUP (ORDER BY height), "
               "CORR(height, weight), COVAR_SAMP(height, weight), MIN(age), MAX(age) FROM patients_a "
               "WHERE smoker = true")
    s_w, s_h, s_a = w[smoker], h[smoker], age[smoker]
    want = [np.median(s_w), np.quantile(s_h, 0.9), np.corrcoef(s_h, s_w)[0, 1], np.cov(s_h, s_w)[0, 1],
            s_a.min(), s_a.max()]
    assert [doc["op"] for doc in sql] == ["median", "quantile", "corr", "cov", "min", "max"]
    for doc, value in zip(sql, want, strict=True):
        assert _approx(doc["value"], value) and doc["rows"] == smoker.sum()


def test_queries_need_a_grant_and_only_owners_grant_or_remove(world):
    state, _, _ = world
    one_line_error(cli(state, "stats", "count", "--table", "patients_a", sae="hospital-b"), "grant")
    one_line_error(cli(state, "table", "grant", "patients_a", "hospital-b", sae="hospital-b"), "hospital-a")
    one_line_error(cli(state, "table", "rm", "patients_a", sae="analyst"), "hospital-a")
    res = cli(state, "stats", "count", "--table", "patients_b", "--json", sae="hospital-b")  # its own table
    assert res.returncode == 0 and json.loads(res.stdout)["value"] == 300
    audit = json.loads(cli(state, "table", "audit", "--json", sae="hospital-a").stdout)
    assert set(audit) == set(SITES)
    for entries in audit.values():
        assert any(e["analyst"] == "analyst" and e["status"] == "ok" and e["tables"] == ["patients_a"]
                   for e in entries)
        assert all(e["analyst"] in ("analyst", "hospital-a") for e in entries)


def test_an_equi_join_across_two_owners(world):
    state, _, root = world
    rng = np.random.default_rng(7)
    ids = [f"P{i:05d}" for i in rng.choice(100000, 120, replace=False)]
    left_ids, right_ids = ids[:90], ids[30:]  # 60 patients in both
    (root / "visits.toml").write_text('[table]\nmin_group_size = 5\n[columns]\npid = { type = "id" }\n'
                                      'visits = { type = "integer", min = 0, max = 50 }\n')
    (root / "labs.toml").write_text('[table]\nmin_group_size = 5\n[columns]\npid = { type = "id" }\n'
                                    'hba1c = { type = "fixed", decimals = 1, min = 3, max = 15 }\n')
    visits = dict(zip(left_ids, rng.integers(0, 50, len(left_ids)).tolist(), strict=True))
    labs = dict(zip(right_ids, (rng.integers(40, 120, len(right_ids)) / 10).tolist(), strict=True))
    (root / "visits.csv").write_text("pid,visits\n" + "".join(f"{k},{v}\n" for k, v in visits.items()))
    (root / "labs.csv").write_text("pid,hba1c\n" + "".join(f"{k},{v:.1f}\n" for k, v in labs.items()))
    for name, owner in (("visits", "hospital-a"), ("labs", "hospital-b")):
        res = cli(state, "table", "put", root / f"{name}.csv", "--name", name, "--schema",
                  root / f"{name}.toml", sae=owner)
        assert res.returncode == 0, res.stderr
        assert cli(state, "table", "grant", name, "analyst", sae=owner).returncode == 0
    both = sorted(set(visits) & set(labs))
    res = cli(state, "stats", "corr", "visits", "hba1c", "--table", "visits", "--join", "labs", "--on", "pid",
              "--json", sae="analyst")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    x = np.array([visits[k] for k in both], dtype=float)
    y = np.array([labs[k] for k in both])
    assert doc["rows"] == len(both) == 60 and _approx(doc["value"], np.corrcoef(x, y)[0, 1])
    # without a grant on the other side, no join; the owner may remove its table
    assert cli(state, "table", "rm", "labs", sae="hospital-b").returncode == 0
    assert "labs" not in {t["name"] for t in json.loads(cli(state, "table", "ls", "--json").stdout)}
    res = cli(state, "table", "put", root / "labs.csv", "--name", "labs", "--schema", root / "labs.toml",
              sae="hospital-b")
    assert res.returncode == 0, res.stderr
    assert cli(state, "table", "revoke", "labs", "analyst", sae="hospital-b").returncode == 0
    one_line_error(cli(state, "stats", "count", "--table", "visits", "--join", "labs", "--on", "pid",
                       sae="analyst"), "grant")


def test_a_node_that_refuses_makes_the_others_stop_at_once(world):
    state, _, root = world
    (root / "tiny.toml").write_text('[table]\nmin_group_size = 1\n[columns]\n'
                                    'v = { type = "integer", min = 0, max = 9 }\n')
    (root / "tiny.csv").write_text("v\n1\n2\n3\n")
    assert cli(state, "table", "put", root / "tiny.csv", "--name", "tiny", "--schema", root / "tiny.toml",
               sae="hospital-c").returncode == 0
    assert cli(state, "table", "grant", "tiny", "analyst", sae="hospital-c").returncode == 0

    async def drop_on_first_node(qs):
        await qs.nodes[0].call("DELETE", "/v1/tables/tiny")  # node s1 only: the nodes now disagree

    api(state, "hospital-c", drop_on_first_node)
    started = time.monotonic()
    res = cli(state, "stats", "sum", "v", "--table", "tiny", "--where", "v > 1", sae="analyst")
    err = one_line_error(res)
    assert time.monotonic() - started < 20  # not the 60 s round timeout of the nodes that started
    assert "tiny" in err


def test_a_node_down_mid_query_fails_cleanly_and_the_rest_carry_on(world):
    state, data, _ = world
    live = ClusterState.load(state)
    victim = live.node("s4")
    outcome: dict[str, subprocess.CompletedProcess[str]] = {}

    def run() -> None:
        outcome["res"] = cli(state, "stats", "median", "weight", "--table",
                             "patients_a,patients_b,patients_c",
                             sae="analyst")

    audit = sqlite3.connect(live.node("s1").data / "tables.sqlite")
    started = audit.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
    th = threading.Thread(target=run)
    th.start()
    deadline = time.monotonic() + 60
    while audit.execute("SELECT COUNT(*) FROM audit WHERE status = 'running'").fetchone()[0] == 0:
        assert time.monotonic() < deadline and th.is_alive(), "the query never started"
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)  # the nodes are in the protocol's rounds (about 90 of them)
    th.join(300)
    one_line_error(outcome["res"])
    (status,) = audit.execute("SELECT status FROM audit WHERE id > ? ORDER BY id LIMIT 1",
                              (started,)).fetchone()
    assert status.startswith("failed"), status
    w = np.concatenate([data[o]["weight"] for o in OWNERS])
    res = cli(state, "stats", "median", "weight", "--table", "patients_a,patients_b,patients_c", "--json",
              sae="analyst")
    assert res.returncode == 0, res.stderr
    assert _approx(json.loads(res.stdout)["value"], np.median(w))
