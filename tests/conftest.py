"""Shared fixtures: a real grpc.aio server on an ephemeral port over a real SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from casledger.service.client import LedgerClient, connect
from casledger.service.config import Settings
from casledger.service.server import RunningServer, serve


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(db=f"sqlite:///{tmp_path / 'ledger.db'}", grpc_listen="127.0.0.1:0",
                    no_http=True, shutdown_grace_s=1.0)


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[RunningServer]:
    async with serve(settings) as running:
        yield running


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[LedgerClient]:
    async with connect(server.target) as ledger:
        yield ledger
