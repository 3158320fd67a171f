"""``rtcore serve --role``: gateway, api and processor as separate processes on one Redis."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from .procs import TIMEOUT, RawSubscriber, ServerProcess, assert_alive, history, private_redis, processes, wait_until

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.asyncio_only(reason="the nodes are subprocesses running asyncio; a trio run would repeat the same servers"),
]

N = 30


async def test_gateway_api_processor_processes_share_one_redis(tmp_path: Path) -> None:
    """Proves: three ``rtcore serve`` processes with one role each behave as one
    server: HTTP commands sent to the ``api`` process reach WebSocket
    subscribers of the ``gateway`` process in order; the consumer-group
    processor runs on the ``processor`` process only (every side effect carries
    its pid, once per source event); the gateway answers 404 on ``/v1/cmd``, the
    api process refuses to upgrade ``/v1/ws``, and the processor process serves
    neither."""
    with private_redis(persistent=False) as redis:
        gateway = ServerProcess(redis.url, tmp_path, "gateway", roles=["gateway"])
        api = ServerProcess(redis.url, tmp_path, "api", roles=["api"])
        processor = ServerProcess(redis.url, tmp_path, "processor", roles=["processor"])
        async with processes(gateway, api, processor), httpx.AsyncClient(timeout=TIMEOUT) as http:
            for s in (gateway, api, processor):
                health = (await http.get(f"{s.http}/v1/health")).json()
                assert health["roles"] == [s.name] and health["status"] == "ok"

            # Routes of roles a process does not have.
            r = await http.post(f"{gateway.http}/v1/cmd/put", json={"stream": "jobs:1", "i": 0})
            assert r.status_code == 404 and r.json()["code"] == "not_found"
            r = await http.post(f"{processor.http}/v1/cmd/put", json={"stream": "jobs:1", "i": 0})
            assert r.status_code == 404
            for s in (api, processor):
                with pytest.raises(InvalidStatus) as info:
                    async with connect(s.ws, subprotocols=[Subprotocol("rtcore.v1.json")], open_timeout=TIMEOUT):
                        pass
                assert info.value.response.status_code == 404
                assert json.loads(info.value.response.body or b"{}").get("code") == "not_found"
            r = await http.get(f"{gateway.http}/v1/streams/jobs:1")
            assert r.status_code == 404  # history is the api role's

            jobs = RawSubscriber([gateway], "jobs:1", name="jobs")
            effects = RawSubscriber([gateway], "effects:1", name="effects")
            async with anyio.create_task_group() as tg:
                tg.start_soon(jobs.run)
                tg.start_soon(effects.run)
                with anyio.fail_after(TIMEOUT):
                    await jobs.subscribed.wait()
                    await effects.subscribed.wait()
                acked = {}
                for i in range(N):
                    r = await http.post(f"{api.http}/v1/cmd/put", json={"stream": "jobs:1", "i": i}, headers={"Idempotency-Key": f"j{i}"})
                    assert r.status_code == 200, r.text
                    acked[i] = r.json()["result"]
                await wait_until(lambda: jobs.offset >= N and effects.offset >= N, what="jobs and their effects at the gateway")
                tg.cancel_scope.cancel()
            _, _, fx_history = await history(http, api, "effects:1")
            assert_alive([gateway, api, processor])

    assert jobs.gaps == jobs.dups == 0 and jobs.offsets() == list(range(1, N + 1))
    assert [e["data"]["i"] for e in jobs.events] == list(range(N))
    assert sorted(acked.values()) == list(range(1, N + 1))
    fx = [e["data"] for e in effects.events]
    assert sorted(d["offset"] for d in fx) == list(range(1, N + 1)), "an effect is missing or doubled"
    assert {d["pid"] for d in fx} == {processor.pid}, "a processor ran outside the processor process"
    assert len(fx_history) == N
