"""The engine: an :class:`~rtcore.engine.app.App` running on a backend.

:mod:`.app` declares (commands, hooks, rules); :mod:`.node` runs the
declaration on a :class:`~rtcore.backends.Backend`: command dispatch through
the idempotency rules, publishing, subscriptions with the catch-up → live
handoff, stateful-stream followers, processors and loops. :mod:`.hub` fans
events out; :mod:`.metrics` records what happens. Nothing here knows about
sockets or HTTP: the server and the test helpers drive a node.
"""
