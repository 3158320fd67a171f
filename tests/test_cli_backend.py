"""`rtcore serve --backend` accepts URLs and plain file names (SQLite)."""

from __future__ import annotations

import os

from rtcore.cli import backend_url


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
