"""The S3 gateway with real clients against real processes: boto3, the AWS CLI, rclone, s3fs.

One cluster for the module, started by :func:`client.cluster.up` (deploy/local.toml: five nodes,
k = 3, and the S3 gateway with a generated key pair). A second gateway, run by `qstore s3 serve`
with a credentials file of two users, checks per-user bucket rights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from client import cluster
from client.s3 import users as s3users

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3") / "state"
    state = cluster.up(None, root)
    try:
        yield root, cluster.gateway_of(state)
    finally:
        result = cluster.down(root)
        assert "gateway" in result.stopped


def client(gw, *, secret: str | None = None, access: str | None = None, region: str = "eu-central-1"):
    _, info = gw
    return boto3.client("s3", endpoint_url=info["url"], aws_access_key_id=access or info["access_key"],
                        aws_secret_access_key=secret or info["secret_key"], region_name=region,
                        config=Config(retries={"max_attempts": 0}, s3={"addressing_style": "path"}))


def code(exc: pytest.ExceptionInfo) -> tuple[str, int]:
    err = exc.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]


def test_state_and_credentials(gw):
    root, info = gw
    assert info["url"].startswith("http://127.0.0.1:")
    assert (root / "cluster.json").stat().st_mode & 0o077 == 0
    assert Path(info["credentials"]).stat().st_mode & 0o077 == 0
    out = subprocess.run([sys.executable, "-m", "client.cli", "s3", "credentials", "--state", str(root)],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[:3] == ["[default]", f"aws_access_key_id = {info['access_key']}",
                                    f"aws_secret_access_key = {info['secret_key']}"]
    assert info["url"] in out
    report = cluster.status(root)
    assert any(p["id"] == "gateway" and p["health"] == "ok" for p in report["processes"])
    assert info["secret_key"] not in (root / "logs" / "gateway.log").read_text()


def test_buckets_objects_metadata_ranges_and_conditionals(gw):
    s3 = client(gw)
    s3.create_bucket(Bucket="objs", CreateBucketConfiguration={"LocationConstraint": "eu-central-1"})
    assert "objs" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    s3.head_bucket(Bucket="objs")
    with pytest.raises(ClientError) as e:
        s3.head_bucket(Bucket="nothere")
    assert code(e)[1] == 404
    with pytest.raises(ClientError) as e:
        s3.list_objects_v2(Bucket="nothere")
    assert code(e) == ("NoSuchBucket", 404)

    data = os.urandom(300_000)
    put = s3.put_object(Bucket="objs", Key="dir/a.bin", Body=data, ContentType="application/x-test",
                        Metadata={"colour": "blue"})
    etag = hashlib.md5(data).hexdigest()
    assert put["ETag"] == f'"{etag}"'
    head = s3.head_object(Bucket="objs", Key="dir/a.bin")
    assert (head["ContentLength"], head["ETag"], head["Metadata"], head["ContentType"]) == (
        len(data), f'"{etag}"', {"colour": "blue"}, "application/x-test")
    assert s3.get_object(Bucket="objs", Key="dir/a.bin")["Body"].read() == data
    part = s3.get_object(Bucket="objs", Key="dir/a.bin", Range="bytes=1000-199999")
    assert part["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert part["ContentRange"] == f"bytes 1000-199999/{len(data)}"
    assert part["Body"].read() == data[1000:200000]
    assert s3.get_object(Bucket="objs", Key="dir/a.bin", Range="bytes=-10")["Body"].read() == data[-10:]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="objs", Key="dir/a.bin", Range=f"bytes={len(data)}-")
    assert code(e) == ("InvalidRange", 416)
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="objs", Key="dir/a.bin", IfMatch='"0123"')
    assert code(e) == ("PreconditionFailed", 412)
    assert s3.get_object(Bucket="objs", Key="dir/a.bin", IfMatch=etag)["Body"].read() == data
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="objs", Key="dir/a.bin", IfNoneMatch=f'"{etag}"')
    assert code(e)[1] == 304
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="objs", Key="dir/a.bin", IfModifiedSince=head["LastModified"])
    assert code(e)[1] == 304
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="objs", Key="dir/missing")
    assert code(e) == ("NoSuchKey", 404)

    # Content-MD5: a wrong one is BadDigest and nothing is stored
    import base64

    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="objs", Key="bad-md5", Body=b"abc",
                      ContentMD5=base64.b64encode(hashlib.md5(b"abd").digest()).decode())
    assert code(e) == ("BadDigest", 400)
    with pytest.raises(ClientError):
        s3.head_object(Bucket="objs", Key="bad-md5")

    # copy, keep and replace metadata
    s3.copy_object(Bucket="objs", Key="dir/copy.bin", CopySource={"Bucket": "objs", "Key": "dir/a.bin"})
    c = s3.head_object(Bucket="objs", Key="dir/copy.bin")
    assert c["ETag"] == f'"{etag}"' and c["Metadata"] == {"colour": "blue"}
    s3.copy_object(Bucket="objs", Key="dir/copy2.bin", CopySource="objs/dir/a.bin",
                   MetadataDirective="REPLACE", Metadata={"shape": "round"})
    assert s3.head_object(Bucket="objs", Key="dir/copy2.bin")["Metadata"] == {"shape": "round"}
    assert s3.get_object(Bucket="objs", Key="dir/copy2.bin")["Body"].read() == data

    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket="objs")
    assert code(e) == ("BucketNotEmpty", 409)
    s3.delete_object(Bucket="objs", Key="dir/copy2.bin")
    s3.delete_object(Bucket="objs", Key="never-was")  # 204 as on S3
    res = s3.delete_objects(Bucket="objs",
                            Delete={"Objects": [{"Key": "dir/a.bin"}, {"Key": "dir/copy.bin"}]})
    assert sorted(d["Key"] for d in res["Deleted"]) == ["dir/a.bin", "dir/copy.bin"]
    assert s3.list_objects_v2(Bucket="objs")["KeyCount"] == 0
    s3.delete_bucket(Bucket="objs")
    assert "objs" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_listings(gw):
    s3 = client(gw)
    s3.create_bucket(Bucket="lists")
    keys = ["a", "b/1", "b/2", "b/c/3", "c", "d/4", "e"]
    for k in keys:
        s3.put_object(Bucket="lists", Key=k, Body=k.encode())
    v2 = s3.list_objects_v2(Bucket="lists", Delimiter="/")
    assert [o["Key"] for o in v2["Contents"]] == ["a", "c", "e"]
    assert [p["Prefix"] for p in v2["CommonPrefixes"]] == ["b/", "d/"]
    assert v2["Contents"][0]["Size"] == 1
    assert v2["Contents"][0]["ETag"] == f'"{hashlib.md5(b"a").hexdigest()}"'
    sub = s3.list_objects_v2(Bucket="lists", Prefix="b/", Delimiter="/")
    assert [o["Key"] for o in sub["Contents"]] == ["b/1", "b/2"]
    assert sub["CommonPrefixes"] == [{"Prefix": "b/c/"}]
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="lists", PaginationConfig={"PageSize": 2})
    assert [o["Key"] for p in pages for o in p.get("Contents", [])] == keys
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="lists", Delimiter="/",
                                                          PaginationConfig={"PageSize": 2})
    seen = [(o.get("Key") or o.get("Prefix")) for p in pages
            for o in p.get("Contents", []) + p.get("CommonPrefixes", [])]
    assert sorted(seen) == ["a", "b/", "c", "d/", "e"]
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="lists", StartAfter="b/2")["Contents"]] == keys[3:]
    pages = s3.get_paginator("list_objects").paginate(Bucket="lists", PaginationConfig={"PageSize": 3})
    assert [o["Key"] for p in pages for o in p.get("Contents", [])] == keys
    versions = s3.list_object_versions(Bucket="lists")
    assert [v["Key"] for v in versions["Versions"]] == keys and versions["Versions"][0]["VersionId"] == "null"
    boto3.resource("s3", endpoint_url=s3.meta.endpoint_url, aws_access_key_id=gw[1]["access_key"],
                   aws_secret_access_key=gw[1]["secret_key"], region_name="us-east-1") \
        .Bucket("lists").object_versions.delete()
    assert s3.list_objects_v2(Bucket="lists")["KeyCount"] == 0
    s3.delete_bucket(Bucket="lists")


def test_multipart(gw):
    s3 = client(gw)
    s3.create_bucket(Bucket="multi")
    parts = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(123_456)]
    up = s3.create_multipart_upload(Bucket="multi", Key="big", ContentType="video/x-test",
                                    Metadata={"k": "v"})["UploadId"]
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket="multi")["Uploads"]] == [up]
    tags = [s3.upload_part(Bucket="multi", Key="big", UploadId=up, PartNumber=i + 1, Body=p)["ETag"]
            for i, p in enumerate(parts)]
    listed = s3.list_parts(Bucket="multi", Key="big", UploadId=up)["Parts"]
    assert [(p["PartNumber"], p["Size"], p["ETag"]) for p in listed] == [
        (i + 1, len(p), t) for i, (p, t) in enumerate(zip(parts, tags, strict=True))]
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket="multi", Key="big", UploadId=up, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": tags[1]}]})
    assert code(e) == ("InvalidPart", 400)
    body = {"Parts": [{"PartNumber": i + 1, "ETag": t} for i, t in enumerate(tags)]}
    done = s3.complete_multipart_upload(Bucket="multi", Key="big", UploadId=up, MultipartUpload=body)
    expect = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-3"
    assert done["ETag"] == f'"{expect}"'
    again = s3.complete_multipart_upload(Bucket="multi", Key="big", UploadId=up, MultipartUpload=body)
    assert again["ETag"] == done["ETag"]  # completing twice succeeds, as on S3
    whole = b"".join(parts)
    head = s3.head_object(Bucket="multi", Key="big")
    assert (head["ContentLength"], head["ETag"], head["Metadata"], head["ContentType"]) == (
        len(whole), f'"{expect}"', {"k": "v"}, "video/x-test")
    assert hashlib.sha256(s3.get_object(Bucket="multi", Key="big")["Body"].read()).digest() == \
        hashlib.sha256(whole).digest()
    rng = s3.get_object(Bucket="multi", Key="big",
                        Range=f"bytes={5 * MiB - 10}-{10 * MiB + 9}")["Body"].read()
    assert rng == whole[5 * MiB - 10 : 10 * MiB + 10]
    listing = s3.list_objects_v2(Bucket="multi")["Contents"]
    assert [(o["Key"], o["Size"]) for o in listing] == [("big", len(whole))]
    assert s3.list_multipart_uploads(Bucket="multi").get("Uploads", []) == []

    # abort: parts gone, the upload unknown afterwards
    up2 = s3.create_multipart_upload(Bucket="multi", Key="gone")["UploadId"]
    s3.upload_part(Bucket="multi", Key="gone", UploadId=up2, PartNumber=1, Body=b"x" * 1000)
    s3.abort_multipart_upload(Bucket="multi", Key="gone", UploadId=up2)
    with pytest.raises(ClientError) as e:
        s3.list_parts(Bucket="multi", Key="gone", UploadId=up2)
    assert code(e) == ("NoSuchUpload", 404)

    # upload_file (s3transfer) splits into parts itself; download_file reads ranges in parallel
    cfg = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    src = Path(os.environ.get("TMPDIR", "/tmp")) / f"qstore-s3-{os.getpid()}.bin"
    try:
        src.write_bytes(os.urandom(11 * MiB))
        s3.upload_file(str(src), "multi", "file.bin", Config=cfg)
        dst = src.with_suffix(".out")
        s3.download_file("multi", "file.bin", str(dst), Config=cfg)
        assert dst.read_bytes() == src.read_bytes()
        dst.unlink()
    finally:
        src.unlink(missing_ok=True)
    s3.delete_object(Bucket="multi", Key="big")
    s3.delete_object(Bucket="multi", Key="file.bin")
    s3.delete_bucket(Bucket="multi")  # the parts went with their objects


def test_a_put_over_a_multipart_object_drops_its_parts(gw):
    s3 = client(gw)
    s3.create_bucket(Bucket="over")
    s3.put_object(Bucket="over", Key="plain", Body=b"no parts here")  # a bucket without multipart objects
    up = s3.create_multipart_upload(Bucket="over", Key="k")["UploadId"]
    tag = s3.upload_part(Bucket="over", Key="k", UploadId=up, PartNumber=1, Body=b"p" * 1000)["ETag"]
    s3.complete_multipart_upload(Bucket="over", Key="k", UploadId=up,
                                 MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": tag}]})
    s3.put_object(Bucket="over", Key="k", Body=b"replaced")  # right after: the gateway knows of the parts
    assert s3.get_object(Bucket="over", Key="k")["Body"].read() == b"replaced"
    with pytest.raises(ClientError) as e:  # a part of an unknown upload is refused, nothing stored
        s3.upload_part(Bucket="over", Key="k", UploadId="0" * 32, PartNumber=1, Body=b"x" * 100)
    assert code(e) == ("NoSuchUpload", 404)
    s3.delete_object(Bucket="over", Key="k")
    s3.delete_object(Bucket="over", Key="plain")
    s3.delete_bucket(Bucket="over")  # nothing hidden left behind


def test_auth_presigned_bad_signature_unknown_key(gw):
    s3 = client(gw)
    s3.create_bucket(Bucket="auth")
    s3.put_object(Bucket="auth", Key="k", Body=b"secret data")
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "auth", "Key": "k"}, ExpiresIn=60)
    assert urllib.request.urlopen(url).read() == b"secret data"
    put_url = s3.generate_presigned_url("put_object", Params={"Bucket": "auth", "Key": "p"}, ExpiresIn=60)
    req = urllib.request.Request(put_url, data=b"via presigned", method="PUT")
    assert urllib.request.urlopen(req).status == 200
    assert s3.get_object(Bucket="auth", Key="p")["Body"].read() == b"via presigned"
    short = s3.generate_presigned_url("get_object", Params={"Bucket": "auth", "Key": "k"}, ExpiresIn=1)
    time.sleep(2.1)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(short)
    assert e.value.code == 403 and b"<Code>AccessDenied</Code>" in e.value.read()
    tampered = url.replace("Key=k", "Key=p") if "Key=k" in url else url.replace("/auth/k", "/auth/p")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(tampered)
    assert e.value.code == 403

    bad = client(gw, secret="x" * 40)
    with pytest.raises(ClientError) as e:
        bad.put_object(Bucket="auth", Key="forged", Body=b"nope")
    assert code(e) == ("SignatureDoesNotMatch", 403)
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket="auth", Key="forged")
    assert code(e)[1] == 404  # nothing stored
    with pytest.raises(ClientError) as e:
        client(gw, access="AKIAUNKNOWNUNKNOWN00").list_buckets()
    assert code(e) == ("InvalidAccessKeyId", 403)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(gw[1]["url"] + "/auth/k")
    assert e.value.code == 403


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_users_see_only_their_buckets(gw, tmp_path):
    root, _ = gw
    admin, bob = s3users.new_user("admin"), s3users.new_user("bob", ["bobs"])
    creds = tmp_path / "users.json"
    s3users.write(creds, [admin, bob])
    port = _free_port()
    log = (tmp_path / "gw.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "s3", "serve", "--state", str(root),
                             "--port", str(port), "--credentials", str(creds)], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url + "/-/health")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "gw.log").read_text()
                time.sleep(0.1)
        info = {"url": url}
        a = client((root, {**info, "access_key": admin.access_key, "secret_key": admin.secret_key}))
        b = client((root, {**info, "access_key": bob.access_key, "secret_key": bob.secret_key}))
        a.create_bucket(Bucket="admins")
        b.create_bucket(Bucket="bobs")
        b.put_object(Bucket="bobs", Key="x", Body=b"bob's")
        assert [x["Name"] for x in b.list_buckets()["Buckets"]] == ["bobs"]
        with pytest.raises(ClientError) as e:
            b.put_object(Bucket="admins", Key="x", Body=b"intruder")
        assert code(e) == ("AccessDenied", 403)
        with pytest.raises(ClientError) as e:
            b.copy_object(Bucket="bobs", Key="y", CopySource="admins/x")
        assert code(e)[1] in (403, 404)
        assert a.get_object(Bucket="bobs", Key="x")["Body"].read() == b"bob's"
        assert a.list_objects_v2(Bucket="admins")["KeyCount"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


# -- other clients -----------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # CI installs it (.ci/run): a missing tool is a failure, not a skip
        pytest.fail(f"{name} is not installed (apt-get install {name})")
    return path


def _aws_env(gw) -> dict[str, str]:
    _, info = gw
    return {**os.environ, "AWS_ACCESS_KEY_ID": info["access_key"],
            "AWS_SECRET_ACCESS_KEY": info["secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


def test_aws_cli_cp_ls_sync_rm(gw, tmp_path):
    aws = _tool("aws")
    env, url = _aws_env(gw), gw[1]["url"]

    def run(*args: str) -> str:
        done = subprocess.run([aws, "--endpoint-url", url, *args], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("s3", "mb", "s3://awscli")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.txt").write_bytes(b"one")
    (src / "sub" / "two.bin").write_bytes(os.urandom(9 * MiB))  # multipart in the CLI (8 MiB threshold)
    run("s3", "cp", str(src / "one.txt"), "s3://awscli/one.txt")
    run("s3", "sync", str(src), "s3://awscli/tree")
    listing = run("s3", "ls", "--recursive", "s3://awscli")
    assert "one.txt" in listing and "tree/sub/two.bin" in listing and str(9 * MiB) in listing
    assert run("s3", "sync", str(src), "s3://awscli/tree").strip() == ""  # nothing changed
    back = tmp_path / "back"
    run("s3", "sync", "s3://awscli/tree", str(back))
    assert (back / "sub" / "two.bin").read_bytes() == (src / "sub" / "two.bin").read_bytes()
    run("s3", "cp", "s3://awscli/one.txt", str(tmp_path / "one.out"))
    assert (tmp_path / "one.out").read_bytes() == b"one"
    run("s3", "rm", "--recursive", "s3://awscli")
    assert run("s3", "ls", "s3://awscli").strip() == ""
    run("s3", "rb", "s3://awscli")


def test_rclone_copy_check_lsf(gw, tmp_path):
    rclone = _tool("rclone")
    _, info = gw
    conf = tmp_path / "rclone.conf"
    conf.write_text(f"[qs]\ntype = s3\nprovider = Other\naccess_key_id = {info['access_key']}\n"
                    f"secret_access_key = {info['secret_key']}\nendpoint = {info['url']}\n"
                    "region = us-east-1\nforce_path_style = true\n")
    os.chmod(conf, 0o600)

    def run(*args: str) -> str:
        # AWS_CA_BUNDLE (set on some hosts for HTTPS) makes rclone's SDK refuse a plain-HTTP endpoint
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
        done = subprocess.run([rclone, "--config", str(conf), *args], capture_output=True, text=True,
                              timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "d" / "b.bin").write_bytes(os.urandom(300_000))
    run("mkdir", "qs:rclone")
    run("copy", str(src), "qs:rclone/x")
    run("check", str(src), "qs:rclone/x")  # sizes and MD5s (our ETags) agree
    assert sorted(run("lsf", "-R", "qs:rclone/x").split()) == ["a.txt", "d/", "d/b.bin"]
    run("purge", "qs:rclone")


def test_s3fs_mount(gw, tmp_path):
    s3fs = _tool("s3fs")
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse: FUSE cannot mount here")
    _, info = gw
    s3 = client(gw)
    s3.create_bucket(Bucket="fuse")
    passwd = tmp_path / "passwd"
    passwd.write_text(f"{info['access_key']}:{info['secret_key']}\n")
    os.chmod(passwd, 0o600)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run([s3fs, "fuse", str(mnt), "-o", f"passwd_file={passwd}", "-o", f"url={info['url']}",
                           "-o", "use_path_request_style", "-o", "endpoint=us-east-1", "-o", "sigv4",
                           "-o", "stat_cache_expire=1", "-o", "dbglevel=warn"],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0 and "fuse" in done.stderr.lower() and "permission" in done.stderr.lower():
        pytest.skip(f"FUSE cannot mount here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            assert time.monotonic() < deadline, "s3fs did not mount"
            time.sleep(0.1)
        data = os.urandom(200_000)
        (mnt / "written.bin").write_bytes(data)
        (mnt / "dir").mkdir()
        (mnt / "dir" / "note.txt").write_text("through fuse")
        assert s3.get_object(Bucket="fuse", Key="written.bin")["Body"].read() == data
        assert s3.get_object(Bucket="fuse", Key="dir/note.txt")["Body"].read() == b"through fuse"
        s3.put_object(Bucket="fuse", Key="from-boto.txt", Body=b"boto")
        assert sorted(p.name for p in mnt.iterdir()) == ["dir", "from-boto.txt", "written.bin"]
        assert (mnt / "from-boto.txt").read_bytes() == b"boto"
        (mnt / "written.bin").rename(mnt / "renamed.bin")
        assert (mnt / "renamed.bin").read_bytes() == data
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="fuse")["Contents"]]
        assert "renamed.bin" in keys and "written.bin" not in keys
        (mnt / "renamed.bin").unlink()
        (mnt / "dir" / "note.txt").unlink()
        (mnt / "dir").rmdir()
        (mnt / "from-boto.txt").unlink()
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], capture_output=True, timeout=30) if shutil.which(
            "fusermount") else subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
    assert s3.list_objects_v2(Bucket="fuse")["KeyCount"] == 0
    s3.delete_bucket(Bucket="fuse")
