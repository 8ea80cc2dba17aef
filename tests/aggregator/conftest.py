from __future__ import annotations

import pytest

from tests.support.peers import Aggregator


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    aggregator = Aggregator(tmp_path_factory.mktemp("aggregator") / "agg.sqlite3", "--max-body", "262144")
    yield aggregator
    aggregator.stop()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (skips naming the package when absent)."""
    from tests.support.postgres import PostgresCluster

    cluster = PostgresCluster()
    yield cluster
    cluster.stop()
