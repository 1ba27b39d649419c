"""TLS without a front proxy: a gateway (or relay) serves ``https://`` and ``wss://`` on
its own port, dialers check its certificate, and the certificate is replaced while the
process runs. A CA and its certificates are generated here with ``cryptography``;
everything else is real: sockets, TLS handshakes, tunnels, hypercorn."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypercorn.config import Config

from tests.conftest import simulated
from tests.hostile.client import connect as connect_from
from tests.hostile.signal_loop import signal_loop
from tests.log_capture import watching
from tests.processes import START_TIMEOUT, spawn, toml_table, toml_value_lines
from tooti.gateway.app import Gateway
from tooti.mesh.listener import UpgradeRequest
from tooti.mesh.listener import serve as listen
from tooti.node.node import Node
from tooti.runner import Process, serve
from tooti.settings import (
    BackendSettings,
    GatewaySettings,
    NetworkSettings,
    NodeSettings,
    RelaySettings,
    Settings,
    TunnelSettings,
)
from tooti.tls import HANDSHAKE_TIMEOUT, ServerTLS, load_certificate
from tooti.transport.websocket import SUBPROTOCOL, TUNNEL_PATH, HandshakeFailed, connect

TIMEOUT = 30.0
"""Hang guard of every wait (never reached when the code works)."""
MODEL = "tooti-sim"
CHAT = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hello"}]}


# ---------------------------------------------------------------- a private CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def replace(path: Path, data: bytes) -> None:
    """Write ``path`` the way certificate tools do: a new file renamed over the old one."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(data)
    os.replace(fresh, path)


@dataclass
class Authority:
    """A private certificate authority and the files of the server certificate it
    issued last."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    directory: Path

    @classmethod
    def create(cls, directory: Path) -> Authority:
        """A new CA; its certificate is written to ``ca.pem``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(_name("tooti test CA"))
                .issuer_name(_name("tooti test CA")).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False),
                    critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        authority = cls(key, cert, directory)
        authority.ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return authority

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert_path(self) -> Path:
        return self.directory / "server.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / "server-key.pem"

    def issue(self, hours: float = 2.0, names: list[str] | None = None) -> x509.Certificate:
        """A new server certificate (new key, new serial) for ``names``, by default
        127.0.0.1 and localhost, written over ``server.pem`` and ``server-key.pem``."""
        alt_names: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(name)) if name[0].isdigit()
            else x509.DNSName(name) for name in names or ["127.0.0.1", "localhost"]]
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        after = now + datetime.timedelta(hours=hours)
        cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1"))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(min(now - datetime.timedelta(minutes=5),
                                      after - datetime.timedelta(hours=1)))
                .not_valid_after(after)
                .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                               critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        replace(self.key_path, _pem_key(key))
        replace(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert

    def client_context(self) -> ssl.SSLContext:
        """What a client that trusts this CA (and nothing else) uses."""
        return ssl.create_default_context(cafile=str(self.ca_path))


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    authority = Authority.create(tmp_path)
    authority.issue()
    return authority


# ---------------------------------------------------------------- gateways, nodes, logs


@dataclass
class TLSGateway:
    gateway: Gateway
    url: str
    """``https://127.0.0.1:PORT``"""

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def tunnel_url(self) -> str:
        return self.url.replace("https://", "wss://") + TUNNEL_PATH


async def start_gateway(nursery: trio.Nursery, authority: Authority,
                        **settings: Any) -> TLSGateway:
    gateway = Gateway(GatewaySettings(
        listen="127.0.0.1:0", tls_cert=str(authority.cert_path),
        tls_key=str(authority.key_path), first_byte_timeout=10, **settings), TUNNEL)
    urls = await nursery.start(gateway.serve)
    return TLSGateway(gateway, urls[0])


TUNNEL = TunnelSettings(heartbeat_interval=0.5)


@pytest.fixture
async def tls_gateway(nursery: trio.Nursery, authority: Authority
                      ) -> AsyncIterator[TLSGateway]:
    """A gateway serving TLS with the authority's certificate, checking the files for a
    new one every 50 ms."""
    running = await start_gateway(nursery, authority, tls_reload_interval=0.05)
    yield running
    running.gateway.shutdown()


async def start_node(nursery: trio.Nursery, url: str, node_id: str = "node-a",
                     peer_ca: str = "") -> Node:
    node = Node(NodeSettings(peers=[url], id=node_id, reconnect_initial=0.05,
                             reconnect_max=0.5),
                TUNNEL, [simulated()], node_id, network=NetworkSettings(peer_ca=peer_ca))
    await nursery.start(node.run)
    return node


async def wait_for_node(gateway: Gateway, node_id: str) -> None:
    registry = gateway.registry
    with trio.fail_after(TIMEOUT):
        await registry.wait_until(
            lambda: node_id in registry.peers and bool(registry.peers[node_id].models))


async def served_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial number of the certificate a new TLS connection to ``port`` gets."""
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
        try:
            await stream.do_handshake()
            der = stream.getpeercert(binary_form=True)
        finally:
            await trio.aclose_forcefully(stream)
    return x509.load_der_x509_certificate(der).serial_number


async def chat(client: httpx.AsyncClient, url: str) -> None:
    """A non-streamed and a streamed chat request, both answered in full."""
    with trio.fail_after(TIMEOUT):
        response = await client.post(f"{url}/v1/chat/completions", json=CHAT)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]
        async with client.stream("POST", f"{url}/v1/chat/completions",
                                 json={**CHAT, "stream": True}) as streamed:
            assert streamed.status_code == 200
            lines = [line async for line in streamed.aiter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert any(json.loads(line[6:])["choices"][0]["delta"].get("content")
                   for line in lines[:-1] if json.loads(line[6:])["choices"])


# ---------------------------------------------------------------- https and wss on one port


async def test_https_and_wss_share_the_port(nursery: trio.Nursery, tls_gateway: TLSGateway,
                                            authority: Authority) -> None:
    assert tls_gateway.url.startswith("https://127.0.0.1:")
    await start_node(nursery, tls_gateway.tunnel_url, peer_ca=str(authority.ca_path))
    await wait_for_node(tls_gateway.gateway, "node-a")
    async with httpx.AsyncClient(verify=authority.client_context(), timeout=TIMEOUT) as client:
        await chat(client, tls_gateway.url)


async def test_http2_is_negotiated_by_alpn(tls_gateway: TLSGateway,
                                           authority: Authority) -> None:
    async with httpx.AsyncClient(verify=authority.client_context(), http2=True,
                                 timeout=TIMEOUT) as client:
        with trio.fail_after(TIMEOUT):
            response = await client.get(f"{tls_gateway.url}/v1/models")
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"


async def test_the_asgi_app_sees_tls_connections_as_https(nursery: trio.Nursery,
                                                         authority: Authority) -> None:
    """Hypercorn serves the listener's TLS connections as TLS (``https`` in the scope),
    HTTP/2 to a client that chose it by ALPN."""
    context, _ = load_certificate(str(authority.cert_path), str(authority.key_path))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = json.dumps({"scheme": scope["scheme"], "http_version": scope["http_version"]})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body.encode()})

    async def no_tunnels(upgrade: UpgradeRequest) -> None:
        raise AssertionError("no tunnel expected")

    config = Config()
    config.bind, config.accesslog = ["127.0.0.1:0"], None
    stop = trio.Event()
    urls = await nursery.start(partial(listen, app, config, no_tunnels, stop.wait,
                                       tls=lambda: context))
    seen = []
    for http2 in (False, True):
        async with httpx.AsyncClient(verify=authority.client_context(), http2=http2) as client:
            with trio.fail_after(TIMEOUT):
                seen.append((await client.get(f"{urls[0]}/")).json())
    stop.set()
    assert seen == [{"scheme": "https", "http_version": "1.1"},
                    {"scheme": "https", "http_version": "2"}]


async def test_a_relay_serves_tls_and_dials_its_upstream_with_the_ca(
        nursery: trio.Nursery, tls_gateway: TLSGateway, authority: Authority,
        tmp_path: Path) -> None:
    """Built as ``tooti run --role relay --tls-cert ... --peer-ca ...`` builds it: the
    relay's listener serves TLS, its dialer checks the gateway's certificate; a node
    dials the relay over wss://."""
    relay_dir = tmp_path / "relay"
    relay_dir.mkdir()
    relay_ca = Authority.create(relay_dir)  # the relay's certificate has its own CA
    relay_ca.issue()
    process = Process(Settings(
        roles=["relay"], data_dir=str(tmp_path / "relay-data"),
        gateway=GatewaySettings(listen="127.0.0.1:0", tls_cert=str(relay_ca.cert_path),
                                tls_key=str(relay_ca.key_path)),
        relay=RelaySettings(peers=[tls_gateway.tunnel_url], id="relay-1",
                            reconnect_initial=0.05, reconnect_max=0.5),
        network=NetworkSettings(peer_ca=str(authority.ca_path)), tunnel=TUNNEL))
    await nursery.start(serve, process)
    relay_url = process.urls[0]
    assert relay_url.startswith("https://")
    await start_node(nursery, relay_url.replace("https://", "wss://") + TUNNEL_PATH,
                     peer_ca=str(relay_ca.ca_path))
    await wait_for_node(tls_gateway.gateway, "node-a")
    assert tls_gateway.gateway.registry.peers["node-a"].via == "relay-1"
    async with httpx.AsyncClient(verify=authority.client_context(), timeout=TIMEOUT) as client:
        await chat(client, tls_gateway.url)


@pytest.mark.parametrize("role", ["node", "relay"])
async def test_without_the_ca_a_dialer_refuses_the_gateway_and_says_why(
        nursery: trio.Nursery, tls_gateway: TLSGateway, tmp_path: Path, role: str) -> None:
    """No ``peer_ca``: the system's trust store does not know the private CA, so the
    dial fails and the log names the certificate problem."""
    settings = Settings(
        roles=[role], data_dir=str(tmp_path / "data"), tunnel=TUNNEL,
        node=NodeSettings(peers=[tls_gateway.tunnel_url], id="node-a",
                          backends=[BackendSettings(type="simulated")]),
        relay=RelaySettings(peers=[tls_gateway.tunnel_url], id="relay-1"))
    with watching() as logs:
        await nursery.start(serve, Process(settings))
        line = await logs.wait_for(r"tunnel to wss://.*certificate")
    assert "certificate verify failed" in line and "unable to get local issuer" in line
    assert not tls_gateway.gateway.registry.peers


async def test_a_certificate_for_another_name_is_refused(tls_gateway: TLSGateway,
                                                        authority: Authority) -> None:
    tls = tls_gateway.gateway.station.tls
    assert tls is not None
    authority.issue(names=["gateway.example"])  # signed by the trusted CA, wrong name
    with trio.fail_after(TIMEOUT):
        await tls.wait_reload()
    with trio.fail_after(TIMEOUT), pytest.raises(HandshakeFailed) as failed:
        await connect(tls_gateway.tunnel_url, subprotocol=SUBPROTOCOL, max_message=1 << 20,
                      ssl_context=authority.client_context())
    assert "certificate verify failed" in failed.value.reason
    assert "mismatch" in failed.value.reason


# ---------------------------------------------------------------- reloading the certificate


async def test_a_new_certificate_is_picked_up_and_tunnels_stay(
        nursery: trio.Nursery, tls_gateway: TLSGateway, authority: Authority) -> None:
    node = await start_node(nursery, tls_gateway.tunnel_url, peer_ca=str(authority.ca_path))
    await wait_for_node(tls_gateway.gateway, "node-a")
    session = next(iter(node.sessions))
    context = authority.client_context()
    old = await served_serial(tls_gateway.port, context)
    tls = tls_gateway.gateway.station.tls
    assert tls is not None
    new = authority.issue(hours=5)  # same CA, new key, serial and expiry
    assert new.serial_number != old
    with trio.fail_after(TIMEOUT):
        await tls.wait_reload()  # the file watcher noticed within its interval
    assert await served_serial(tls_gateway.port, context) == new.serial_number
    assert node.sessions == {session} and not session.closed.is_set()  # the tunnel stayed
    async with httpx.AsyncClient(verify=context, timeout=TIMEOUT) as client:
        await chat(client, tls_gateway.url)


@pytest.mark.parametrize("breakage", ["garbage", "key-of-another-certificate", "missing"])
async def test_a_broken_new_certificate_keeps_the_old_one(
        tls_gateway: TLSGateway, authority: Authority, breakage: str) -> None:
    context = authority.client_context()
    old = await served_serial(tls_gateway.port, context)
    tls = tls_gateway.gateway.station.tls
    assert tls is not None
    with watching() as logs:
        if breakage == "garbage":
            replace(authority.cert_path, b"-----BEGIN CERTIFICATE-----\nnot one\n")
        elif breakage == "missing":
            authority.cert_path.unlink()
        else:
            key = authority.key_path.read_bytes()
            authority.issue()
            replace(authority.key_path, key)  # the old key does not match the new cert
        with trio.fail_after(TIMEOUT):
            await tls.wait_reload()
        errors = [r for r in logs.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and not errors[0].exc_info
    assert "TLS certificate not reloaded" in errors[0].getMessage()
    assert str(authority.cert_path) in errors[0].getMessage()
    assert await served_serial(tls_gateway.port, context) == old
    assert tls.reload() is False  # and on demand (SIGHUP) the same
    # Once the files are good again, the next check loads them.
    fixed = authority.issue()
    with trio.fail_after(TIMEOUT):
        await tls.wait_reload()
    assert await served_serial(tls_gateway.port, context) == fixed.serial_number


async def test_sighup_reloads_the_certificate(authority: Authority, tmp_path: Path) -> None:
    """A real ``tooti run`` process: SIGHUP loads the new files at once (the file
    check runs only once an hour here)."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        toml_value_lines({"roles": ["gateway"], "log_level": "info", "drain_grace": 0.0})
        + toml_table("gateway", {"listen": "127.0.0.1:0", "tls_cert": str(authority.cert_path),
                                 "tls_key": str(authority.key_path),
                                 "tls_reload_interval": 3600.0}))
    context = authority.client_context()
    async with trio.open_nursery() as nursery:
        tooti = await spawn(nursery, config, tmp_path / "data", "gateway")
        try:
            with trio.fail_after(START_TIMEOUT):
                match = await tooti.wait_for(r"gateway listening on https://127\.0\.0\.1:(\d+)")
            port = int(match.group(1))
            await served_serial(port, context)
            new = authority.issue()
            since = tooti.mark()
            tooti.signal(signal.SIGHUP)
            with trio.fail_after(TIMEOUT):
                await tooti.wait_for(r"TLS certificate reloaded", since)
            assert await served_serial(port, context) == new.serial_number
            assert tooti.alive
        finally:
            await tooti.kill()
        nursery.cancel_scope.cancel()


async def test_a_sighup_reload_that_fails_unexpectedly_is_logged_and_the_process_goes_on(
        authority: Authority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """``tooti run``'s signal loop in this process: a reload that raises something other
    than TLSError (a bug) is logged; the next SIGHUP is handled and SIGTERM still drains
    to exit code 0. It used to end the signal loop, and the process with it."""
    attempts: list[trio.Event] = [trio.Event(), trio.Event()]

    def broken_reload(self: ServerTLS) -> bool:
        if attempts:
            attempts.pop(0).set()
        raise RuntimeError("unexpected failure in reload")

    monkeypatch.setattr(ServerTLS, "reload", broken_reload)
    first, second = attempts
    settings = Settings(roles=["gateway"], data_dir=str(tmp_path / "data"), drain_grace=0.0,
                        gateway=GatewaySettings(listen="127.0.0.1:0",
                                                tls_cert=str(authority.cert_path),
                                                tls_key=str(authority.key_path),
                                                tls_reload_interval=3600.0))
    with trio.fail_after(TIMEOUT):
        async with signal_loop(monkeypatch, settings) as running:
            os.kill(os.getpid(), signal.SIGHUP)
            await first.wait()
            os.kill(os.getpid(), signal.SIGHUP)
            await second.wait()
            port = int(running.process.urls[0].rsplit(":", 1)[1])
            assert await served_serial(port, authority.client_context()) > 0
            os.kill(os.getpid(), signal.SIGTERM)
    exit_codes = running.exit_codes
    assert exit_codes == [0]
    failures = [r for r in caplog.records if "reloading the TLS certificate failed" in
                r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info for r in failures)


# ---------------------------------------------------------------- the wrong protocol


async def test_plain_http_to_the_tls_port_gets_a_400_and_the_listener_goes_on(
        tls_gateway: TLSGateway, authority: Authority) -> None:
    with watching() as logs:
        with trio.fail_after(TIMEOUT):
            stream = await trio.open_tcp_stream("127.0.0.1", tls_gateway.port)
            await stream.send_all(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
            await stream.aclose()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ")
        assert b"content-type: application/json" in head.lower()
        error = json.loads(body)["error"]
        assert error["code"] == "tls_required" and "https://" in error["message"]
        async with httpx.AsyncClient(verify=authority.client_context()) as client:
            assert (await client.get(f"{tls_gateway.url}/healthz")).status_code == 200
    assert not logs.problems()


async def test_tls_to_a_plain_port_fails_cleanly(nursery: trio.Nursery) -> None:
    gateway = Gateway(GatewaySettings(listen="127.0.0.1:0"), TUNNEL)
    with watching() as logs:
        urls = await nursery.start(gateway.serve)
        port = int(urls[0].rsplit(":", 1)[1])
        with trio.fail_after(TIMEOUT):
            async with httpx.AsyncClient(verify=ssl.create_default_context()) as client:
                with pytest.raises(httpx.ConnectError):
                    await client.get(f"https://127.0.0.1:{port}/healthz")
            with pytest.raises(HandshakeFailed) as failed:
                await connect(f"wss://127.0.0.1:{port}{TUNNEL_PATH}", subprotocol=SUBPROTOCOL,
                              max_message=1 << 20)
            assert failed.value.reason.startswith("TLS handshake with 127.0.0.1 failed")
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{urls[0]}/healthz")).status_code == 200
        gateway.shutdown()
    assert not logs.problems()


@pytest.mark.parametrize("sends", [b"", b"\x16\x03\x01\x02\x00"], ids=["silent", "partial"])
async def test_a_tls_handshake_that_never_completes_is_cut(
        autojump_clock: trio.testing.MockClock, nursery: trio.Nursery,
        authority: Authority, sends: bytes) -> None:
    """Virtual time: the listener closes a connection that has not finished its TLS
    handshake within the handshake timeout, and keeps serving."""
    running = await start_gateway(nursery, authority)
    stream = await trio.open_tcp_stream("127.0.0.1", running.port)
    await stream.send_all(sends)
    started = trio.current_time()
    with trio.fail_after(HANDSHAKE_TIMEOUT * 3):
        assert await stream.receive_some(1024) == b""  # closed by the gateway
    assert trio.current_time() - started >= HANDSHAKE_TIMEOUT * 0.99
    await stream.aclose()
    context = authority.client_context()
    assert await served_serial(running.port, context) > 0
    running.gateway.shutdown()


async def test_shutdown_closes_unfinished_tls_handshakes_at_once(
        nursery: trio.Nursery, authority: Authority) -> None:
    """Connections in their TLS handshake (silent, or part of a ClientHello sent) are
    closed when the listener shuts down; they used to hold the shutdown up to the
    handshake timeout. Timeouts and grace are an hour, so only the shutdown can close
    them."""
    context, _ = load_certificate(str(authority.cert_path), str(authority.key_path))
    hour = 3600.0

    async def no_tunnels(upgrade: UpgradeRequest) -> None:
        raise AssertionError("no tunnel expected")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise AssertionError("no request expected")

    config = Config()
    config.bind, config.accesslog, config.graceful_timeout = ["127.0.0.1:0"], None, hour
    stop, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[list[str]]) -> None:
        await listen(app, config, no_tunnels, stop.wait, tls=lambda: context,
                     handshake_timeout=hour, task_status=task_status)
        stopped.set()

    urls = await nursery.start(run)
    port = int(urls[0].rsplit(":", 1)[1])
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    hello = await trio.open_tcp_stream("127.0.0.1", port)
    await hello.send_all(b"\x16\x03\x01\x02\x00")
    await trio.testing.wait_all_tasks_blocked()  # the listener holds both
    stop.set()
    with trio.fail_after(TIMEOUT):
        await stopped.wait()
        for stream in (silent, hello):
            assert await stream.receive_some(1024) == b""
            await stream.aclose()


async def handshakes(port: int, context: ssl.SSLContext, source: str = "127.0.0.1") -> bool:
    """Whether a new connection from ``source`` completes its TLS handshake."""
    with trio.fail_after(TIMEOUT):
        stream = trio.SSLStream(await connect_from(f"https://127.0.0.1:{port}", source),
                                context, server_hostname="127.0.0.1")
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError:
            return False
        finally:
            await trio.aclose_forcefully(stream)
    return True


async def test_a_tls_handshake_flood_from_one_address_is_rate_limited(
        nursery: trio.Nursery, authority: Authority) -> None:
    """New connections from one address past its burst are closed before any TLS
    handshake (no crypto is spent on them), while another address still gets through."""
    burst = 3
    running = await start_gateway(nursery, authority, connection_burst=burst,
                                  connection_rate=0.01)
    context = authority.client_context()
    with watching() as logs:
        assert [await handshakes(running.port, context) for _ in range(burst)] == [True] * burst
        assert [await handshakes(running.port, context) for _ in range(20)] == [False] * 20
        assert await handshakes(running.port, context, "127.0.0.2")
    assert logs.matching(r"^connection from 127\.0\.0\.1 refused: too many new connections")
    assert not logs.problems()
    running.gateway.shutdown()


# ---------------------------------------------------------------- unusable files at start


@pytest.mark.parametrize("problem", ["garbage", "wrong-key", "expired", "missing-ca"])
def test_unusable_tls_files_stop_tooti_run_with_one_line(
        authority: Authority, problem: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from tooti.cli import main

    cert, key, ca = authority.cert_path, authority.key_path, authority.ca_path
    if problem == "garbage":
        replace(cert, b"not a certificate")
    elif problem == "wrong-key":
        key = tmp_path / "other-key.pem"
        key.write_bytes(_pem_key(ec.generate_private_key(ec.SECP256R1())))
    elif problem == "expired":
        authority.issue(hours=-1)
    else:
        ca = tmp_path / "nowhere.pem"
    code = main(["run", "--role", "gateway", "--role", "relay", "--listen", "127.0.0.1:0",
                 "--peer", "wss://127.0.0.1:1", "--data-dir", str(tmp_path / "data"),
                 "--tls-cert", str(cert), "--tls-key", str(key), "--peer-ca", str(ca)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    expected = {"garbage": f"gateway.tls_cert: no PEM certificate in {cert}",
                "wrong-key": f"the key in {key} does not belong to the certificate",
                "expired": f"the certificate in {cert} expired on",
                "missing-ca": f"network.peer_ca: cannot read the peer CA file {ca}"}[problem]
    assert expected in err
