"""The gateway's users: access keys, secret keys and the buckets each may use.

Credentials file (JSON, mode 0600: the gateway refuses one others can read)::

    {"users": [{"name": "alice", "access_key": "AKIA...", "secret_key": "...", "buckets": ["*"]},
               {"name": "bob", "access_key": "...", "secret_key": "...", "buckets": ["reports"]}]}

``buckets``: names the user may use (create, list, read, write, delete), or
``"*"`` for all. ListBuckets shows a user only the buckets it may use.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from qstore.errors import LocalError

_ACCESS = re.compile(r"[A-Za-z0-9]{16,128}")
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


@dataclass(frozen=True)
class User:
    name: str
    access_key: str
    secret_key: str
    buckets: frozenset[str]

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise LocalError(f"user name {self.name!r} must be 1-64 of [A-Za-z0-9._@-]")
        if not _ACCESS.fullmatch(self.access_key):
            raise LocalError(f"user {self.name}: access key must be 16-128 letters and digits")
        if not 16 <= len(self.secret_key) <= 128 or not self.secret_key.isascii() or not \
                self.secret_key.isprintable():
            raise LocalError(f"user {self.name}: secret key must be 16-128 printable ASCII characters")

    def may_use(self, bucket: str) -> bool:
        return "*" in self.buckets or bucket in self.buckets

    def __repr__(self) -> str:  # never print a secret
        return f"User(name={self.name!r}, access_key={self.access_key!r}, buckets={sorted(self.buckets)})"


class Users:
    """Users by access key."""

    def __init__(self, users: Iterable[User]):
        self._by_key: dict[str, User] = {}
        for u in users:
            if u.access_key in self._by_key:
                raise LocalError(f"access key of {u.name} is used twice")
            self._by_key[u.access_key] = u

    def get(self, access_key: str) -> User | None:
        return self._by_key.get(access_key)

    def secret_of(self, access_key: str) -> str | None:
        u = self._by_key.get(access_key)
        return None if u is None else u.secret_key

    def __len__(self) -> int:
        return len(self._by_key)

    @classmethod
    def from_json(cls, doc: object, where: str = "credentials") -> Users:
        if not isinstance(doc, Mapping) or not isinstance(doc.get("users"), list) or not doc["users"]:
            raise LocalError(f"{where}: expected {{\"users\": [...]}} with at least one user")
        out = []
        for i, u in enumerate(doc["users"]):
            if not isinstance(u, Mapping):
                raise LocalError(f"{where}: users[{i}] must be an object")
            buckets = u.get("buckets", ["*"])
            if not isinstance(buckets, list) or not all(isinstance(b, str) for b in buckets):
                raise LocalError(f"{where}: users[{i}].buckets must be a list of names")
            try:
                out.append(User(name=str(u.get("name", f"user{i}")), access_key=str(u["access_key"]),
                                secret_key=str(u["secret_key"]), buckets=frozenset(buckets)))
            except KeyError as exc:
                raise LocalError(f"{where}: users[{i}] has no {exc.args[0]}") from None
        return cls(out)

    @classmethod
    def load(cls, path: Path) -> Users:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise LocalError(f"{path}: credentials readable by others (chmod 600 it)")
        try:
            doc = json.loads(path.read_bytes())
        except ValueError:
            raise LocalError(f"{path}: not JSON") from None
        return cls.from_json(doc, str(path))


def new_user(name: str = "admin", buckets: Iterable[str] = ("*",)) -> User:
    """A fresh key pair (20 upper-case alphanumerics and 40 base64-ish characters, as AWS's look)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    access = "QS" + "".join(secrets.choice(alphabet) for _ in range(18))
    secret = secrets.token_urlsafe(30)[:40]
    return User(name=name, access_key=access, secret_key=secret, buckets=frozenset(buckets))


def write(path: Path, users: Iterable[User]) -> None:
    """Write a credentials file readable by its owner only, atomically."""
    doc = {"users": [{"name": u.name, "access_key": u.access_key, "secret_key": u.secret_key,
                      "buckets": sorted(u.buckets)} for u in users]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, json.dumps(doc, indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
