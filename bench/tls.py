"""What TLS costs on the gateway's own listener, on loopback.

Starts two gateways, one plain (``http://``, ``ws://``) and one serving a certificate
from a private CA generated here (``https://``, ``wss://``), and one node dialing each
(the TLS one with ``--peer-ca``), both on the same instant simulated backend. Then, for
each gateway in turn:

* new connections: a fresh client per request (TCP connect, TLS handshake if any,
  ``GET /healthz``, close), so the handshake's cost shows;
* keep-alive requests: non-streamed chat completions and streamed ones (time to first
  token) over one kept-alive connection, alternating between the two gateways;

and reports the median and 90th percentile of each, and each gateway's CPU per request.

Run from the repository root with the project's venv::

    python bench/tls.py [--connections 300] [--requests 400]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import ssl
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from children import (
    Children,
    cpu_seconds,
    free_port,
    percentile,
    run_in_temp_dir,
    toml_table,
    wait_for_models,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

KINDS = ("plain", "tls")
BODY = {"model": "tooti-sim", "messages": [{"role": "user", "content": "hello there"}]}


def make_certificates(root: Path) -> None:
    """``ca.pem``, and ``cert.pem``/``key.pem`` for 127.0.0.1 signed by it (P-256)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (root / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def start(children: Children, root: Path) -> dict[str, tuple[str, Any]]:
    """Both gateways and their nodes; kind → (base URL, gateway child)."""
    make_certificates(root)
    common = 'log_level = "warning"\ndrain_grace = 0.0\n'
    started: dict[str, tuple[str, Any]] = {}
    for kind in KINDS:
        port = free_port()
        gateway: dict[str, object] = {"listen": f"127.0.0.1:{port}"}
        if kind == "tls":
            gateway |= {"tls_cert": str(root / "cert.pem"), "tls_key": str(root / "key.pem")}
        config = root / f"gateway-{kind}.toml"
        config.write_text(common + toml_table("gateway", gateway))
        child = children.start(f"gateway-{kind}", [
            sys.executable, "-m", "tooti", "run", "--role", "gateway", "--config", str(config),
            "--data-dir", str(root / f"gateway-{kind}-data")])
        scheme = "https" if kind == "tls" else "http"
        started[kind] = (f"{scheme}://127.0.0.1:{port}", child)
        config = root / f"node-{kind}.toml"
        config.write_text(
            common + toml_table("node", {"id": f"node-{kind}", "reconnect_max": 0.5})
            + toml_table("[[node.backends]]", {"type": "simulated", "max_concurrency": 4})
            + toml_table("network", {"peer_ca": str(root / "ca.pem")}))
        children.start(f"node-{kind}", [
            sys.executable, "-m", "tooti", "run", "--role", "node", "--config", str(config),
            "--peer", f"{'wss' if kind == 'tls' else 'ws'}://127.0.0.1:{port}",
            "--data-dir", str(root / f"node-{kind}-data")])
    return started


async def fresh_connection(base: str, context: ssl.SSLContext) -> float:
    """Milliseconds for one request on a connection of its own."""
    began = time.perf_counter()
    async with httpx.AsyncClient(verify=context, timeout=30) as client:
        response = await client.get(f"{base}/healthz")
    ended = time.perf_counter()
    if response.status_code != 200:
        raise RuntimeError(f"{base}: {response.status_code}")
    return (ended - began) * 1000


async def kept_alive(client: httpx.AsyncClient, base: str) -> tuple[float, float]:
    """Milliseconds for a non-streamed answer and to a streamed answer's first token."""
    began = time.perf_counter()
    response = await client.post(f"{base}/v1/chat/completions", json=BODY)
    whole = (time.perf_counter() - began) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{base}: {response.status_code} {response.text[:200]}")
    began = time.perf_counter()
    first = 0.0
    async with client.stream("POST", f"{base}/v1/chat/completions",
                             json={**BODY, "stream": True}) as reply:
        async for chunk in reply.aiter_bytes():
            if not first and b"data: " in chunk:
                first = (time.perf_counter() - began) * 1000
    return whole, first


async def benchmark(connections: int, requests: int, children: Children, root: Path) -> None:
    """Start everything, measure, print the report."""
    started = start(children, root)
    context = ssl.create_default_context(cafile=str(root / "ca.pem"))
    fresh: dict[str, list[float]] = {kind: [] for kind in KINDS}
    whole: dict[str, list[float]] = {kind: [] for kind in KINDS}
    first: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cpu: dict[str, float] = {}
    async with httpx.AsyncClient(verify=context, timeout=30) as client:
        for base, _ in started.values():
            await wait_for_models(client, base)
        for base, _ in started.values():  # warm-up, not recorded
            for _ in range(20):
                await fresh_connection(base, context)
                await kept_alive(client, base)
        for kind, (base, child) in started.items():
            cpu[kind] = cpu_seconds(child.pid)
            for _ in range(connections):
                fresh[kind].append(await fresh_connection(base, context))
            cpu[kind] = cpu_seconds(child.pid) - cpu[kind]
        for _ in range(requests):
            for kind, (base, _) in started.items():
                ms_whole, ms_first = await kept_alive(client, base)
                whole[kind].append(ms_whole)
                first[kind].append(ms_first)
    print(f"TLS on the gateway's listener: python {sys.version.split()[0]}, "
          f"{ssl.OPENSSL_VERSION}, P-256 certificate, loopback, sequential")
    print(f"{'ms':<34}{'plain p50':>10}{'tls p50':>10}{'added':>8}{'plain p90':>11}"
          f"{'tls p90':>10}")
    for label, samples in ((f"new connection + GET /healthz ({connections})", fresh),
                           (f"kept alive: non-stream ({requests})", whole),
                           (f"kept alive: first token ({requests})", first)):
        plain, tls = samples["plain"], samples["tls"]
        print(f"{label:<34}{statistics.median(plain):>10.3f}{statistics.median(tls):>10.3f}"
              f"{statistics.median(tls) - statistics.median(plain):>8.3f}"
              f"{percentile(plain, 0.9):>11.3f}{percentile(tls, 0.9):>10.3f}")
    print("gateway CPU per new connection: " + ", ".join(
        f"{kind} {cpu[kind] * 1000 / connections:.3f} ms" for kind in KINDS))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benchmark, stop every child."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300,
                        help="fresh connections per gateway (default 300)")
    parser.add_argument("--requests", type=int, default=400,
                        help="kept-alive rounds (default 400)")
    args = parser.parse_args(argv)
    return run_in_temp_dir("tooti-tls-bench-", benchmark, args.connections, args.requests)


if __name__ == "__main__":
    raise SystemExit(main())
