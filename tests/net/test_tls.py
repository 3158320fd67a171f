"""TLS (``--tls-cert/--tls-key``): https and wss on one port."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from websockets.typing import Subprotocol

from rtcore.cli import _ssl_context
from tests.ws_client import connect

from .conftest import TIMEOUT, serving
from .netapp import app

pytestmark = pytest.mark.anyio


@pytest.fixture
def cert(tmp_path: Path) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    crt, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
        check=True,
        capture_output=True,
    )
    return str(crt), str(key)


async def test_https_and_wss(cert: tuple[str, str]) -> None:
    crt, key = cert
    context = _ssl_context(crt, key)
    client = ssl.create_default_context(cafile=crt)
    async with serving(app, ssl_context=context) as server:
        async with httpx.AsyncClient(verify=client, timeout=TIMEOUT) as http:
            r = await http.post(f"https://127.0.0.1:{server.port}/v1/cmd/add", json={"a": 2, "b": 2})
            assert r.json()["result"] == 4
        async with connect(
            f"wss://127.0.0.1:{server.port}/v1/ws", ssl=client, subprotocols=[Subprotocol("rtcore.v1.json")], open_timeout=TIMEOUT
        ) as ws:
            await ws.send('{"t":"hello","v":1}')
            assert '"welcome"' in await ws.recv()


def test_cli_tls_context_is_tls12_or_newer_without_compression(cert: tuple[str, str]) -> None:
    """``rtcore serve --tls-*`` refuses TLS < 1.2 and TLS compression (docs/security.md).

    Mutation: set ``minimum_version = ssl.TLSVersion.TLSv1`` in ``_ssl_context``
    (or clear ``OP_NO_COMPRESSION``) → this test fails.
    """
    context = _ssl_context(*cert)
    assert context is not None
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.verify_mode == ssl.CERT_NONE  # clients are not asked for certificates
