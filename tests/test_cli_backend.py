"""`rtcore serve --backend` accepts URLs and plain file names (SQLite)."""

from __future__ import annotations

import os

import pytest

from rtcore.cli import backend_url
from rtcore.protocol.streams import DEFAULT_CURSOR_TTL


def test_urls_pass_through() -> None:
    for url in ("memory://", "sqlite:///rel.db", "redis://127.0.0.1:6379/0"):
        assert backend_url(url) == url


def test_a_file_name_means_sqlite(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "events.db")
    assert backend_url(path) == "sqlite:///" + path
    assert backend_url("events.db") == "sqlite:///" + os.path.abspath("events.db")
    assert backend_url("events.db").startswith("sqlite:////")


def test_idempotency_options_reach_the_node(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import rtcore.cli as cli

    seen: dict[str, object] = {}

    def fake_run(app: object, **kwargs: object) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(cli, "run", fake_run)
    assert cli.main(["serve", "examples/counter/app.py:app", "--idempotency-ttl", "60", "--idempotency-lease", "2"]) == 0
    assert seen["idempotency_ttl"] == 60.0 and seen["idempotency_lease"] == 2.0
    assert seen["cursor_ttl"] == DEFAULT_CURSOR_TTL == 7 * 24 * 3600.0


def test_cursor_ttl_reaches_the_node(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """``--cursor-ttl`` is passed on; a value that is not a positive number of seconds is refused.

    Mutation: drop ``cursor_ttl=args.cursor_ttl`` from ``_serve``'s call → fails.
    """
    import rtcore.cli as cli

    seen: dict[str, object] = {}
    monkeypatch.setattr(cli, "run", lambda app, **kwargs: seen.update(kwargs))
    assert cli.main(["serve", "examples/counter/app.py:app", "--cursor-ttl", "3600"]) == 0
    assert seen["cursor_ttl"] == 3600.0
    for bad in ("0", "-5", "inf"):
        seen.clear()
        with pytest.raises(SystemExit) as exit_:
            cli.main(["serve", "examples/counter/app.py:app", "--cursor-ttl", bad])
        assert exit_.value.code == 2 and seen == {} and "--cursor-ttl" in capsys.readouterr().err
