"""Fuzzing, bounded for CI: Hypothesis strategies, a timed mutation run, and the saved corpus.

The targets (``fuzz_targets.py``) are the frame decoder in both encodings,
the HTTP head scanner, wsproto with a live protocol session behind it, and
the HTTP command route on a running node. Each asserts that only documented
errors come out and that what comes out is consistent.

The long run (a million inputs per target and more) is
``python -m tests.hardening.fuzz``; its figures are in docs/security.md.
CI runs ``RTCORE_FUZZ_SECONDS`` (default 12) seconds of mutation per target
plus the Hypothesis examples below.

Mutations seen caught:

* restore the old ``HeadScanner.scan`` order (bare-LF check before the line
  limits) → ``regress-bare-lf-after-long-line`` in the corpus fails: 400 in
  one read, 414 when split;
* make ``Codec._decode`` raise ``ValueError`` instead of ``BadFrame`` for a
  frame that does not validate → ``test_codec_properties`` fails;
* answer an unknown command with a 500 in ``Routes._command`` →
  ``test_http_command_route_properties`` fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import fuzz
from .fuzz_targets import TARGETS, codec, http_command, http_head, websocket_session

EXAMPLES = int(os.environ.get("RTCORE_FUZZ_EXAMPLES", "400"))
SECONDS = float(os.environ.get("RTCORE_FUZZ_SECONDS", "12"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
frame_dicts = st.fixed_dictionaries(
    {"t": st.sampled_from(["hello", "cmd", "sub", "unsub", "ack", "ping", "auth", "evt", "ok", "err", "bogus"])},
    optional={
        "id": st.integers(-5, 2**64 - 1) | st.text(max_size=3),
        "v": st.integers(0, 3),
        "name": st.text(max_size=12),
        "args": json_values,
        "key": st.text(max_size=300) | st.none(),
        "stream": st.text(max_size=30),
        "since": st.fixed_dictionaries({"epoch": st.text(max_size=8), "offset": st.integers(-3, 2**64 - 1)}),
        "offset": st.integers(-3, 2**64 - 1),
        "token": st.text(max_size=20) | st.none(),
        "cursor": st.booleans(),
    },
)


@SETTINGS
@given(frame=frame_dicts, encoding=st.sampled_from(["json", "msgpack"]))
def test_codec_properties(frame: dict[str, object], encoding: str) -> None:
    data = msgspec.json.encode(frame) if encoding == "json" else msgspec.msgpack.encode(frame)
    codec(data)


@SETTINGS
@given(data=st.binary(max_size=600))
def test_codec_on_raw_bytes(data: bytes) -> None:
    codec(data)


@SETTINGS
@given(
    lines=st.lists(st.binary(max_size=80) | st.sampled_from([b"Host: x", b"Content-Length: 1", b" folded", b""]), max_size=12),
    ending=st.sampled_from([b"\r\n", b"\n", b"\r"]),
)
def test_http_head_properties(lines: list[bytes], ending: bytes) -> None:
    http_head(b"GET / HTTP/1.1\r\n" + ending.join(lines) + b"\r\n\r\n")


@SETTINGS
@given(frames=st.lists(st.tuples(st.integers(0, 255), frame_dicts.map(msgspec.json.encode)), max_size=6), junk=st.binary(max_size=20))
def test_websocket_session_properties(frames: list[tuple[int, bytes]], junk: bytes) -> None:
    data = b"\x00" + b"".join(bytes([ctl & 0xF7 if ctl % 5 else ctl, min(len(f), 255)]) + f[:255] for ctl, f in frames) + junk
    websocket_session(data)


@SETTINGS
@given(selector=st.binary(min_size=10, max_size=10), body=json_values.map(msgspec.json.encode) | st.binary(max_size=100))
def test_http_command_route_properties(selector: bytes, body: bytes) -> None:
    http_command(selector + body)


@pytest.mark.parametrize("target", list(TARGETS))
def test_mutation_fuzz_budget(target: str) -> None:
    """A time-boxed run of the mutation engine (the long form runs a million inputs)."""
    failures = fuzz.run_random(target, TARGETS[target], runs=10**9, seconds=SECONDS, seed=7)
    assert failures == 0, f"{target}: see the saved input under tests/hardening/corpus/{target}/"


CORPUS_FILES = sorted(p for p in fuzz.CORPUS.glob("*/*") if p.is_file())


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[f"{p.parent.name}/{p.name}" for p in CORPUS_FILES])
def test_saved_corpus_replays(path: Path) -> None:
    """Every input a fuzz run once failed on stays fixed."""
    TARGETS[path.parent.name](path.read_bytes())
