"""A node's catalog in PostgreSQL (a real server this session starts, tests/pgserver.py).

tests/test_store.py runs every store test on both catalogs; here: what only PostgreSQL has (a schema per
node held by a lock, URLs without secrets, an unreachable server) and a cluster started from a file.
"""

from __future__ import annotations

import os
import socket
import tomllib
import uuid

import psycopg
import pytest
from test_store import bodies, put, upload

from nodes.store import Store
from qkd_sim.network import ConfigError, Network
from qstore.cluster import check_catalog_url
from qstore.errors import LocalError
from tests.storage_cluster import put_get, three_sites_toml


def schema() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("url", ["postgresql://u:hunter2@db/q", "postgres://u@db/q?password=hunter2"])
def test_a_password_in_the_url_is_refused_without_repeating_it(url):
    with pytest.raises(LocalError, match="no password in it") as err:
        check_catalog_url(url)
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("url", ["mysql://u@db/q", "sqlite:///x", "", None, 5, "postgresql://"])
def test_only_postgresql_urls(url):
    with pytest.raises(LocalError, match="postgresql://"):
        check_catalog_url(url)


def test_data_outlives_the_store_and_a_schema_has_one_store(tmp_path, postgres_url):
    s = schema()
    up = upload("a/b")
    with Store(tmp_path / "n", fsync=False, catalog_url=postgres_url, catalog_schema=s) as store:
        store.create_bucket("bkt")
        put(store, up, bodies(3))
        # a second node on the same schema would corrupt both: refused while the first holds it
        with pytest.raises(LocalError, match="in use by another store"):
            Store(tmp_path / "other", fsync=False, catalog_url=postgres_url, catalog_schema=s)
    with Store(tmp_path / "n", fsync=False, catalog_url=postgres_url, catalog_schema=s) as store:
        [v] = store.versions("bkt", "a/b")
        assert (v.object_id, v.chunks) == (up.object_id, 3)
        assert store.read_chunk(v, 2)[1] == bodies(3)[2]
    with psycopg.connect(postgres_url) as db:  # the rows are in the node's own schema
        (n,) = db.execute(f'SELECT COUNT(*) FROM "{s}".chunks').fetchone()
        assert n == 3
        (collation,) = db.execute(
            "SELECT collation_name FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'versions' AND column_name = 'key'", (s,)).fetchone()
        assert collation == "C"  # listings in the byte order of UTF-8, as S3 lists


def test_a_newer_catalog_is_refused(tmp_path, postgres_url):
    s = schema()
    Store(tmp_path / "n", fsync=False, catalog_url=postgres_url, catalog_schema=s).close()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute(f'UPDATE "{s}".catalog_version SET version = 99')
    with pytest.raises(LocalError, match="catalog schema 99 is newer"):
        Store(tmp_path / "n", fsync=False, catalog_url=postgres_url, catalog_schema=s)


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(LocalError, match=rf"catalog postgresql://qstore@127.0.0.1:{port}/q: cannot connect"):
        Store(tmp_path / "n", fsync=False, catalog_url=f"postgresql://qstore@127.0.0.1:{port}/q")
    assert not (tmp_path / "n" / "catalog.sqlite3").exists()
    Store(tmp_path / "n", fsync=False).close()  # the directory's lock was released


@pytest.mark.parametrize("schema_name", ["Upper", "1x", "a-b", "x" * 64])
def test_bad_schema_names(tmp_path, postgres_url, schema_name):
    with pytest.raises(LocalError, match="catalog schema"):
        Store(tmp_path / "n", fsync=False, catalog_url=postgres_url, catalog_schema=schema_name)




def test_a_cluster_file_puts_nodes_catalogs_in_postgresql(tmp_path, postgres_url):
    from client import cluster

    south = schema()
    conf = tmp_path / "sites.toml"
    storage = {"north": {"catalog": postgres_url},
               "south": {"catalog": postgres_url, "catalog_schema": south}}
    conf.write_text(three_sites_toml("pgsites", storage))
    root = tmp_path / "state"
    state = cluster.up(conf, root, gateway=False, timeout_s=60)
    try:
        assert state.node("north").storage == {"backend": "local", "catalog": postgres_url}
        data = os.urandom(2 * (64 << 10) + 9)
        assert put_get(state, data) == data
    finally:
        cluster.down(root)
    with psycopg.connect(postgres_url) as db:
        for where in ("qstore_node_north", south):
            (n,) = db.execute(f'SELECT COUNT(*) FROM "{where}".versions WHERE key = %s', ("obj",)).fetchone()
            assert n == 1, where
    for site in ("north", "south"):
        assert not (root / "nodes" / site / "catalog.sqlite3").exists()
        assert list((root / "nodes" / site / "objects").iterdir())  # the shares stay on the node's disk
    assert (root / "nodes" / "east" / "catalog.sqlite3").exists()


def test_cluster_file_catalog_rules():
    def net(storage: str) -> Network:
        text = f'[[sites]]\nname = "a"\n[sites.storage]\n{storage}\n[[sites]]\nname = "b"\n'
        text += '[[links]]\na = "a"\nb = "b"\nrate = "unlimited"\n[cluster]\nk = 2\n'
        return Network.from_dict(tomllib.loads(text), source="x.toml")

    with pytest.raises(ConfigError, match="no password in it") as err:
        net('catalog = "postgresql://q:hunter2@db/q"')
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="catalog_schema"):
        net('catalog = "postgresql://q@db/q"\ncatalog_schema = "Bad-Name"')
    site = net('backend = "s3"\nbucket = "b"\ncatalog = "postgresql://q@db/q"').site("a")
    assert site.storage.to_json() == {"backend": "s3", "bucket": "b", "catalog": "postgresql://q@db/q"}
