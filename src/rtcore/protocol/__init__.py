"""The sans-IO core: rtcore's wire protocol and rules, with no I/O at all.

Every module here takes bytes, frames, values and the current time as
arguments and returns frames, actions and decisions; none imports an event
loop, a socket, a thread or a clock (``tests/test_sansio.py`` checks it in a
fresh interpreter). The engine, the server, the clients and the test helpers
drive these modules; they never re-implement their rules.

* :mod:`.types`: value types (events, positions, outcomes, snapshots).
* :mod:`.frames`, :mod:`.codec`: the wire protocol and its two encodings.
* :mod:`.session`: the server side of one connection.
* :mod:`.streams`: stream names, resume plans, the catch-up → live handoff.
* :mod:`.state`: folding, snapshots and checksums.
* :mod:`.idempotency`: fingerprints and the replay / reuse / in-progress rules.
* :mod:`.client`: the client side of a connection (``ClientSession``), driven
  by :mod:`rtcore.client` and :mod:`rtcore.testing`.
* :mod:`.backoff`: the one retry-delay rule.
"""
