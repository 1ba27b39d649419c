"""A gateway's id (review finding 14): ``gateway.gateway_id`` when configured, else a
random id made once and kept in ``<data_dir>/gateway-id`` — stable across restarts (a
restart reconciles its own leases), distinct between machines sharing a hostname and a
port (cloned images used to share ``<hostname>:<port>``, so one gateway reconciled
another's live leases)."""

from __future__ import annotations

import socket
from pathlib import Path

from tooti.runner import GATEWAY_ID_FILE, gateway_id, stored_gateway_id
from tooti.settings import GatewaySettings, Settings


def settings(data_dir: Path, configured: str = "") -> Settings:
    return Settings(data_dir=str(data_dir),
                    gateway=GatewaySettings(listen="0.0.0.0:8080", gateway_id=configured))


def test_an_unconfigured_gateway_id_is_random_and_kept(tmp_path: Path) -> None:
    first = gateway_id(settings(tmp_path / "a"))
    assert first.startswith("gw-") and len(first) == 19
    assert socket.gethostname() not in first
    assert (tmp_path / "a" / GATEWAY_ID_FILE).read_text().strip() == first
    assert gateway_id(settings(tmp_path / "a")) == first  # the restart: the same gateway
    # Another machine (data dir) with the same hostname and port: another gateway.
    assert gateway_id(settings(tmp_path / "b")) != first


def test_a_configured_id_wins_and_a_broken_file_is_replaced(tmp_path: Path) -> None:
    assert gateway_id(settings(tmp_path, "gw-east")) == "gw-east"
    assert not (tmp_path / GATEWAY_ID_FILE).exists()
    (tmp_path / GATEWAY_ID_FILE).write_text("two words\n")
    made = stored_gateway_id(tmp_path)
    assert made.startswith("gw-") and made != "two words"
    assert stored_gateway_id(tmp_path) == made
