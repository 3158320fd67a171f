"""Open a wallet store by URL: picks the engine module for the scheme.

Kept apart from :mod:`.store` (the interface) so the engines can import the
interface without the interface importing them back.
"""

from __future__ import annotations

from .store import WalletStore

__all__ = ["open_wallet_store"]


async def open_wallet_store(url: str) -> WalletStore:
    """Open (and create the tables of) the wallet store named by ``url``.

    Args:
        url: ``sqlite:///relative.db``, ``sqlite:////abs/path.db``, or a
            libpq URL ``postgresql://user@host:port/db``; a ``schema=name``
            query parameter selects the PostgreSQL schema (created if missing).

    Returns:
        An open store; close it with :meth:`WalletStore.aclose`.

    Raises:
        ValueError: unknown scheme.
        ImportError: ``psycopg`` is missing (the message names the extra).
        BackendError: the database could not be opened.
    """
    if url.startswith("sqlite://"):
        from .sqlite_store import SqliteWalletStore

        return await SqliteWalletStore.open(url)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from .postgres_store import PostgresWalletStore
        except ImportError as exc:
            # Name the extra, as open_backend does for redis (a bare "No module named psycopg" helps nobody).
            raise ImportError(f"the PostgreSQL wallet store needs an extra: pip install 'rtcore[postgres]' ({exc})", name=exc.name) from exc

        return await PostgresWalletStore.open(url)
    raise ValueError(f"unsupported wallet store URL {url!r}: use sqlite:///path.db or postgresql://...")
