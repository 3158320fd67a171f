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
