"""``rtcore wallet reconcile``: the verdict is the exit status, the report is for people.

The ledgers are built with the stores directly, then damaged with plain SQL
the way a bad migration or a hand edit would, and the command is run the way
an operator runs it: in a separate process (``python -m rtcore.wallet.cli``)
for the end-to-end cases, and through :func:`main` for the rest (faster, and
the output can be inspected).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from rtcore.backends import open_backend
from rtcore.wallet import TransferRequest, open_wallet_store
from rtcore.wallet.cli import EXIT_ERROR, EXIT_MISMATCH, EXIT_OK, add_wallet_commands, main
from rtcore.wallet.router import BALANCE_CHANGED
from tests.wallet.stores import PG_URL, require_store


async def _build(store_url: str, events_url: str | None = None, *, publish: bool = True) -> None:
    """A small sound ledger; with ``events_url`` its records are published there."""
    store = await open_wallet_store(store_url)
    try:
        await store.create_account("house:EUR", "EUR", kind="system")
        for name in ("alice", "bob"):
            await store.create_account(name, "EUR", owner=name)
        await store.transfer(TransferRequest("d1", "house:EUR", "alice", 100, "EUR"))
        await store.transfer(TransferRequest("t1", "alice", "bob", 30, "EUR"))
        if events_url is not None and publish:
            backend = await open_backend(events_url)
            try:
                for change in await store.unpublished():
                    await backend.events.append(
                        f"wallet:{change.account}",
                        BALANCE_CHANGED,
                        change,
                        now=time.time(),
                        key=f"entry:{change.entry_id}",
                    )
                await store.mark_published(c.entry_id for c in await store.unpublished())
            finally:
                await backend.aclose()
    finally:
        await store.aclose()


def _sqlite(path: Path, sql: str) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


@pytest.fixture
def ledger(tmp_path: Path) -> tuple[str, str, Path]:
    """URLs of a sound wallet store and its event log, and the store's file."""
    db = tmp_path / "wallet.db"
    store_url, events_url = f"sqlite:///{db}", f"sqlite:///{tmp_path / 'events.db'}"
    anyio.run(_build, store_url, events_url)
    return store_url, events_url, db


def test_a_sound_ledger_exits_0(ledger: tuple[str, str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    store_url, events_url, _ = ledger
    assert main(["reconcile", "--store", store_url, "--events", events_url]) == EXIT_OK
    out = capsys.readouterr().out
    assert "accounts: 3, entries replayed: 4" in out
    assert "EUR: entries sum to 0" in out
    assert "3 streams checked" in out
    assert "OK: balances, entries and streams agree" in out


def test_a_corrupted_balance_exits_1_in_a_separate_process(ledger: tuple[str, str, Path], tmp_path: Path) -> None:
    store_url, events_url, db = ledger
    # Money appears from nowhere: the balance column no longer matches the entries.
    _sqlite(db, "UPDATE wallet_accounts SET available = available + 5 WHERE id = 'bob'")
    proc = subprocess.run(
        [sys.executable, "-m", "rtcore.wallet.cli", "reconcile", "--store", store_url, "--events", events_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == EXIT_MISMATCH, proc.stderr
    assert "MISMATCH" in proc.stdout
    assert "[balance] bob: stored available/held 35/0, entries say 30/0" in proc.stdout
    assert "[zero_sum] EUR: stored balances of EUR sum to 5, not 0" in proc.stdout


def test_a_clean_run_in_a_separate_process_exits_0(ledger: tuple[str, str, Path], tmp_path: Path) -> None:
    store_url, events_url, _ = ledger
    proc = subprocess.run(
        [sys.executable, "-m", "rtcore.wallet.cli", "reconcile", "--store", store_url, "--events", events_url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr


def test_a_forged_entry_breaks_the_chain_and_the_zero_sum(
    ledger: tuple[str, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    store_url, _, db = ledger
    _sqlite(db, "UPDATE wallet_entries SET delta = delta + 1 WHERE id = (SELECT max(id) FROM wallet_entries)")
    assert main(["reconcile", "--store", store_url, "--json"]) == EXIT_MISMATCH
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    kinds = {(m["kind"], m["subject"]) for m in report["mismatches"]}
    assert ("entry_chain", "bob") in kinds
    assert ("zero_sum", "EUR") in kinds
    assert report["events"] is None


def test_a_stream_that_disagrees_with_the_store_exits_1(
    ledger: tuple[str, str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    store_url, events_url, _ = ledger

    async def forge() -> None:
        backend = await open_backend(events_url)
        try:
            # Same entry id as bob's last entry, another balance: clients were told a lie.
            data = {"account": "bob", "currency": "EUR", "available": 999, "held": 0, "delta": 0, "held_delta": 0,
                    "transfer_id": "t1", "entry_id": 4, "reason": "transfer"}  # fmt: skip
            await backend.events.append("wallet:bob", BALANCE_CHANGED, data, now=time.time())
        finally:
            await backend.aclose()

    anyio.run(forge)
    assert main(["reconcile", "--store", store_url]) == EXIT_OK  # the ledger itself is sound
    assert main(["reconcile", "--store", store_url, "--events", events_url]) == EXIT_MISMATCH
    out = capsys.readouterr().out
    assert "[stream] bob: the stream says available/held 999/0 at entry 4, the ledger 30/0" in out


def test_streams_behind_by_the_outbox_are_lagging_not_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_url, events_url = f"sqlite:///{tmp_path / 'w.db'}", f"sqlite:///{tmp_path / 'e.db'}"
    anyio.run(lambda: _build(store_url, events_url, publish=False))
    anyio.run(open_backend, events_url)  # create the (empty) event log
    assert main(["reconcile", "--store", store_url, "--events", events_url]) == EXIT_OK
    assert "lagging streams (entries still in the outbox, not an error): 3" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["reconcile", "--store", "sqlite:///does/not/exist.db"],
        ["reconcile", "--store", "mysql://nope"],
        ["reconcile", "--store", "postgresql://nobody@127.0.0.1:1/none"],
    ],
)
def test_a_store_that_cannot_be_opened_exits_2(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == EXIT_ERROR
    assert "rtcore wallet reconcile:" in capsys.readouterr().err
    assert not (tmp_path / "does").exists()  # a typo must not create an empty ledger


def test_a_missing_event_log_file_exits_2(ledger: tuple[str, str, Path], tmp_path: Path) -> None:
    store_url, _, _ = ledger
    assert main(["reconcile", "--store", store_url, "--events", f"sqlite:///{tmp_path / 'typo.db'}"]) == EXIT_ERROR
    assert not (tmp_path / "typo.db").exists()


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as info:
        main(["reconcile"])  # --store is required
    assert info.value.code == 2


def test_mounts_on_the_top_level_parser_and_redacts_passwords(capsys: pytest.CaptureFixture[str]) -> None:
    # What rtcore.cli does: its own parser, our subcommands, args.func(args).
    parser = argparse.ArgumentParser(prog="rtcore")
    add_wallet_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["wallet", "reconcile", "--store", "postgresql://app:s3cret@127.0.0.1:1/db"])
    assert args.store.startswith("postgresql://")
    assert args.func(args) == EXIT_ERROR
    assert "s3cret" not in capsys.readouterr().out


@pytest.mark.postgres
def test_postgres_store_corrupted_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_store("postgres")
    import uuid

    import psycopg

    schema = f"wallet_test_{uuid.uuid4().hex[:16]}"
    url = f"{PG_URL}?schema={schema}"
    try:
        anyio.run(_build, url)
        assert main(["reconcile", "--store", url]) == EXIT_OK
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'UPDATE "{schema}".wallet_accounts SET available = available - 7 WHERE id = %s', ("alice",))
        assert main(["reconcile", "--store", url]) == EXIT_MISMATCH
        assert "[balance] alice: stored available/held 63/0, entries say 70/0" in capsys.readouterr().out
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
