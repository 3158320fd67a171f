"""Run a page of the guide as a reader would: every code block, in order, in an empty folder.

Used for docs/tutorial.md and the how-to guides whose examples are complete
(:data:`RUNNABLE`). The page marks what each block is, and this runner refuses any other block
(so no block of the tutorial goes unexecuted; on a how-to page, ``strict=False``
lets untitled ``python`` fragments and ``sh`` blocks through unrun):

* ```` ```python title="FILE" ```` — write the block to ``FILE`` (the whole
  file; a later block with the same title replaces it, as the page says).
* ```` ```console ```` — lines starting with ``$ `` are commands, the lines
  after each one the output it must print (compared line by line, with runs
  of spaces collapsed and pytest's ``in 0.50s`` timing ignored). Commands:
  ``mkdir D``, ``cd D`` (joined with ``&&``), ``rtcore serve ...`` (started
  in the background like the reader's first terminal; starting it again
  first stops the previous one with SIGINT, the reader's Ctrl-C, which must
  exit 0), ``python ...`` and ``pytest ...`` (run to the end; exit status 0).

The one liberty taken: the page uses the default port 8000, which other
programs on a shared machine may hold, so ``rtcore serve`` gets ``--port``
with a free port and the files get ``127.0.0.1:<that port>`` instead of
``127.0.0.1:8000``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
TUTORIAL = DOCS / "tutorial.md"
#: Pages whose every code block is run (the other how-tos show commands that
#: need a Redis or a second machine, or fragments of these).
RUNNABLE = ("tutorial.md", "howto/authentication.md", "howto/testing.md", "howto/wallet.md")
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(?P<lang>\w+)(?P<attrs>[^\n]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
TITLE = re.compile(r'title="(?P<title>[^"]+)"')
TIMING = re.compile(r" in \d+(\.\d+)?s\b.*$")
RUN_TIMEOUT = 120.0
START_TIMEOUT = 30.0


class TutorialError(AssertionError):
    """A step of the tutorial did not do what the page says."""


@dataclass
class Block:
    lang: str
    title: str | None
    body: str
    line: int
    page: str = "docs/tutorial.md"

    def where(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(text: str, page: str = "docs/tutorial.md") -> list[Block]:
    """The fenced code blocks of a page, in order."""
    blocks = []
    for m in FENCE.finditer(text):
        title = TITLE.search(m["attrs"])
        blocks.append(
            Block(m["lang"], title["title"] if title else None, m["body"], text.count("\n", 0, m.start()) + 1, page)
        )
    return blocks


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def normalise(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        line = " ".join(line.split())
        if line:
            out.append(TIMING.sub("", line))
    return out


class Tutorial:
    """Runs blocks in ``base`` (an empty folder); :meth:`close` stops the server."""

    def __init__(self, base: Path, *, strict: bool = True) -> None:
        self.cwd = base
        self.strict = strict
        self.port = free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.server_log = base / "server.log"
        self.executed = 0
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"

    # --- blocks -------------------------------------------------------------------

    def run(self, blocks: list[Block]) -> None:
        for block in blocks:
            if block.lang == "python" and block.title:
                body = block.body.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")
                (self.cwd / block.title).write_text(body)
            elif block.lang == "console":
                self.console(block)
            elif not self.strict and block.lang in ("python", "sh", "text", "json"):
                continue  # a how-to's fragment or a command to read, not to run
            else:
                raise TutorialError(f"{block.where()}: a ```{block.lang} block the test cannot run (no title=?)")
            self.executed += 1

    def console(self, block: Block) -> None:
        steps: list[tuple[str, list[str]]] = []
        for line in block.body.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(line)
            elif line.strip():
                raise TutorialError(f"{block.where()}: output before any command: {line!r}")
        for command, expected in steps:
            for part in command.split("&&"):
                self.command(block, shlex.split(part), expected)

    def command(self, block: Block, argv: list[str], expected: list[str]) -> None:
        where = f"{block.where()}: $ {shlex.join(argv)}"
        name, args = argv[0], argv[1:]
        if name == "mkdir" and len(args) == 1:
            (self.cwd / args[0]).mkdir()
        elif name == "cd" and len(args) == 1:
            self.cwd = self.cwd / args[0]
        elif name == "rtcore" and args[:1] == ["serve"]:
            if expected:
                raise TutorialError(f"{where}: the test does not compare a server's output")
            self.start_server([str(BIN / "rtcore"), *args, "--port", str(self.port)], where)
        elif name in ("python", "pytest"):
            cmd = [sys.executable, *args] if name == "python" else [sys.executable, "-m", "pytest", *args]
            self.check_output(cmd, expected, where)
        else:
            raise TutorialError(f"{where}: a command the test does not know how to run")

    # --- processes ------------------------------------------------------------------

    def check_output(self, cmd: list[str], expected: list[str], where: str) -> None:
        try:
            done = subprocess.run(cmd, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise TutorialError(f"{where}: still running after {RUN_TIMEOUT} s") from exc
        if done.returncode != 0:
            raise TutorialError(
                f"{where}: exit status {done.returncode}\n{done.stdout}\n{done.stderr}{self.server_tail()}"
            )
        got, want = normalise(done.stdout.splitlines()), normalise(expected)
        if got != want:
            raise TutorialError(f"{where}: printed\n{done.stdout}\nbut the page shows\n" + "\n".join(expected))

    def start_server(self, cmd: list[str], where: str) -> None:
        self.stop_server(where)
        log = self.server_log.open("ab")
        self.server = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # wait until it answers, as a reader waits for the "serving" line
            if self.server.poll() is not None:
                raise TutorialError(f"{where}: the server exited with {self.server.returncode}{self.server_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TutorialError(f"{where}: no answer on /v1/health after {START_TIMEOUT} s{self.server_tail()}")
            time.sleep(0.1)

    def stop_server(self, where: str) -> None:
        """Ctrl-C: SIGINT, a graceful stop that must exit 0."""
        server, self.server = self.server, None
        if server is None:
            return
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired as exc:
            server.kill()
            server.wait()
            raise TutorialError(f"{where}: the server did not stop on Ctrl-C") from exc
        if code != 0:
            raise TutorialError(f"{where}: the server exited {code} on Ctrl-C{self.server_tail()}")

    def server_tail(self) -> str:
        if not self.server_log.exists():
            return ""
        return "\nserver log:\n" + "\n".join(self.server_log.read_text(errors="replace").splitlines()[-30:])

    def close(self) -> None:
        """Stop a server still running (the page ends with Ctrl-C)."""
        self.stop_server("end of the tutorial")

    def kill(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
            self.server = None
