"""Shared fixtures: every kernel backend this CPU runs, and bounded hypothesis profiles."""

import os

import pytest
from hypothesis import HealthCheck, settings

from qstore import linmap

settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("slow", max_examples=2000, deadline=None)
settings.load_profile("slow" if os.environ.get("QSTORE_SLOW") else "ci")

BACKENDS = linmap.available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server of this test session (tests/pgserver.py): the URL of its database `qstore`."""
    import pgserver

    with pgserver.server() as url:
        yield url
