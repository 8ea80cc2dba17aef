from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.peers import Aggregator, FaultProxy


@pytest.fixture
def aggregator(tmp_path: Path):
    server = Aggregator(tmp_path / "aggregator.sqlite3")
    yield server
    server.stop()


@pytest.fixture
def proxy_factory(aggregator):
    proxies = []

    def make(**options) -> FaultProxy:
        proxy = FaultProxy(aggregator.base, **options)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
