"""The ASGI adapter passes the real-socket protocol tests of ``rtcore serve``.

The tests imported below are the very functions of test_ws.py, test_sse.py,
test_limits.py, test_bad_input.py and test_direct_ws.py; the ``server_kind`` fixture (autouse,
parametrised) makes their ``serving(...)`` run :func:`rtcore.asgi.asgi_app`
under uvicorn and under hypercorn instead of :class:`rtcore.Server`, so the
same clients (``websockets``, httpx) check the same wire behaviour.
uvicorn runs on asyncio only: its trio runs are deselected (conftest).

Mutations of the adapter these runs catch (each checked: break, watch fail, undo):

* ``AsgiWebSocket.receive`` skips the ``max_message_bytes`` check → the
  1009 test fails under both servers (their own caps are 16 MiB).
* ``AsgiApp._read_body`` skips both body-limit checks → the 413 test fails.
* ``AsgiWebSocket.close`` always sends 1000 → the slow-consumer test gets
  1000, not 4008.
* ``_negotiate`` skips the origin check → the origin test's refused
  upgrades succeed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.net import conftest

from .asgi_servers import KINDS
from .test_bad_input import (  # noqa: F401  (collected here again, under the ASGI servers)
    test_binary_frame_on_a_json_connection,
    test_text_frame_on_a_msgpack_connection_is_bad_frame,
)
from .test_direct_ws import test_the_raw_msg_frame_reaches_each_connection_of_the_principal  # noqa: F401
from .test_limits import (  # noqa: F401
    test_bad_token_on_websocket_is_err_unauthenticated_then_1008,
    test_bad_token_over_http_is_401,
    test_command_rate_limit_is_retryable_and_keeps_the_connection,
    test_http_body_too_big_is_413,
    test_message_too_big_closes_1009_and_welcome_announces_the_real_limit,
    test_no_hello_in_time_gets_bye_timeout_and_1008,
    test_origin_allowlist_refuses_with_403_before_upgrade,
    test_too_many_subscriptions,
    test_websocket_reader_that_stops_reading_gets_bye_slow_consumer_and_4008,
)
from .test_sse import (  # noqa: F401
    test_sse_bad_last_event_id_is_400,
    test_sse_client_that_stops_reading_is_cut_then_resumes_exactly_once,
    test_sse_live_then_resume_with_last_event_id,
)
from .test_ws import (  # noqa: F401
    test_commands_ok_and_errors,
    test_history_page_over_http,
    test_idempotent_retry_over_websocket_then_http_returns_the_first_result,
    test_json_is_the_default_without_subprotocol,
    test_json_subprotocol,
    test_malformed_frames_get_bad_frame_and_everyone_carries_on,
    test_msgpack_subprotocol_uses_binary_frames,
    test_only_unknown_subprotocols_are_refused_before_upgrade,
    test_pages_are_served,
    test_resume_after_the_client_drops,
    test_server_cursor_resumes_from_the_last_ack,
    test_subscribe_replay_then_live_without_gap,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True, params=KINDS)
def server_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test of this module runs under each ASGI server."""
    conftest.SERVER_KIND = request.param
    try:
        yield request.param
    finally:
        conftest.SERVER_KIND = "rtcore"
