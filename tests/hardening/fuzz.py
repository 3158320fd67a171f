"""Run the fuzz targets at scale.

    python -m tests.hardening.fuzz                       # every target, 1,000,000 inputs each
    python -m tests.hardening.fuzz --target codec --runs 5000000
    python -m tests.hardening.fuzz --engine atheris      # coverage-guided (pip install atheris)
    python -m tests.hardening.fuzz --seconds 15          # time-boxed (what CI runs)

The ``random`` engine mutates a seed corpus of valid inputs (bit flips, byte
insertions and deletions, splices, boundary bytes) with a fixed seed, so a
run can be repeated. Any input that makes a target raise is written to
``tests/hardening/corpus/<target>/crash-<sha1>`` and the run fails; commit
the file together with the fix, and ``test_fuzz.py`` replays it forever.
Each run prints inputs, inputs/s and peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"

_SEEDS: dict[str, list[bytes]] = {
    "codec": [
        b'{"t":"hello","v":1,"token":"abc"}',
        b'{"t":"cmd","id":7,"name":"echo","args":{"a":[1,2.5,"x",null,true]},"key":"k-1"}',
        b'{"t":"sub","id":2,"stream":"room:1","since":{"epoch":"e1","offset":5},"cursor":true}',
        b'{"t":"ack","stream":"room:1","offset":9}',
        b'{"t":"evt","stream":"s:1","epoch":"e","offset":1,"type":"x","data":{},"ts":1.5}',
        b'{"t":"ok","id":1,"result":null}',
        b"\x83\xa1t\xa5hello\xa1v\x01\xa5token\xa3abc",
        b"\x85\xa1t\xa3cmd\xa2id\x07\xa4name\xa4echo\xa4args\x92\x01\xc3\xa3key\xa1k",
    ],
    "http_head": [
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/cmd/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nIdempotency-Key: k\r\n\r\n\"hi\"",
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 300 + b"\r\n\r\n",
    ],
    "websocket_session": [
        b"\x00\x22" + b'{"t":"sub","id":1,"stream":"a:b"}',
        b"\x00\x3a" + b'{"t":"cmd","id":2,"name":"echo","args":[1],"key":"idem-1"}',
        b"\x00\x1a" + b'{"t":"ping","id":3}       ' + b"\x0e\x02\x03\xe8",
        b"\x01\x05" + b'{"t":' + b"\x00\x10" + b'"ack","stream":"',
        b"\x11\x08" + b"\x81\xa1t\xa4ping",
    ],
    "http_command": [
        b"\x00\x00" + b"x" * 8 + b'"hello"',
        b"\x01\x03" + b"key-0001" + b'{"a":1,"b":2}',
        b"\x01\x01" + b"........" + b'{"a":1,"b":"2","c":3}',
        b"\x00\x00" + b"........" + b"[" * 40,
    ],
}


def mutations(seeds: list[bytes], rnd: random.Random) -> Iterator[bytes]:
    """An endless stream of mutated inputs."""
    interesting = [b"\x00", b"\xff", b"\r\n", b"\n", b'"', b"{", b"}", b"[", b"-1", b"1e999", b"\x7f", b"\xc0", b"\x81", b" "]
    while True:
        data = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randrange(1, 6)):
            op = rnd.randrange(6)
            pos = rnd.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(pos, len(data) - 1)] ^= 1 << rnd.randrange(8)
            elif op == 1:
                data[pos:pos] = bytes([rnd.randrange(256)])
            elif op == 2 and data:
                del data[pos : pos + rnd.randrange(1, 8)]
            elif op == 3:
                data[pos:pos] = rnd.choice(interesting)
            elif op == 4:
                other = rnd.choice(seeds)
                cut = rnd.randrange(len(other) + 1)
                data = data[:pos] + other[cut:]
            else:
                data[pos:pos] = data[pos : pos + rnd.randrange(1, 32)] * rnd.randrange(1, 4)
        yield bytes(data[:4096])


def save_crash(target: str, data: bytes) -> Path:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"crash-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


def run_random(target: str, fn: Callable[[bytes], None], runs: int, seconds: float | None, seed: int) -> int:
    """Feed ``runs`` mutated inputs (or until ``seconds``); return the number of failures."""
    rnd = random.Random(seed)
    started = time.perf_counter()
    failures = 0
    n = 0
    for n, data in enumerate(mutations(_SEEDS[target], rnd), 1):
        try:
            fn(data)
        except Exception:
            failures += 1
            path = save_crash(target, data)
            print(f"{target}: input {n} failed, saved to {path}", file=sys.stderr)
            traceback.print_exc()
            if failures >= 5:
                break
        if n >= runs or (seconds is not None and n % 256 == 0 and time.perf_counter() - started > seconds):
            break
    elapsed = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"{target}: {n:,} inputs in {elapsed:.1f} s ({n / elapsed:,.0f}/s), {failures} failures, peak RSS {rss} MB")
    return failures


def run_atheris(target: str, runs: int) -> int:
    """One target under atheris, in a child process (atheris exits when done)."""
    code = (
        "import atheris, sys\n"
        "with atheris.instrument_imports():\n"
        "    from tests.hardening.fuzz_targets import TARGETS\n"
        f"fn = TARGETS[{target!r}]\n"
        "atheris.Setup([sys.argv[0], '-runs=%d' % int(sys.argv[1]), '-rss_limit_mb=4096', '-artifact_prefix=' + sys.argv[2]], fn)\n"
        "atheris.Fuzz()\n"
    )
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, str(runs), f"{folder}/crash-"], check=False)
    print(f"{target}: atheris, {runs:,} runs, {time.perf_counter() - started:.1f} s, exit {result.returncode}")
    return 0 if result.returncode == 0 else 1


def main(argv: list[str] | None = None) -> int:
    from .fuzz_targets import TARGETS

    parser = argparse.ArgumentParser(prog="python -m tests.hardening.fuzz")
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target (default 1,000,000)")
    parser.add_argument("--seconds", type=float, default=None, help="stop each target after this long")
    parser.add_argument("--engine", choices=["random", "atheris"], default="random")
    parser.add_argument("--seed", type=int, default=20261130)
    args = parser.parse_args(argv)
    names = list(TARGETS) if args.target == "all" else [args.target]
    failures = 0
    for name in names:
        if args.engine == "atheris":
            failures += run_atheris(name, args.runs)
        else:
            failures += run_random(name, TARGETS[name], args.runs, args.seconds, args.seed)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
