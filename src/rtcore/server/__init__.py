"""Serving an app: the session driver, HTTP routes, SSE and the process runner.

This package joins the engine (a :class:`~rtcore.engine.node.Node`) and the
transport (:mod:`rtcore.transport`: HTTP/1.1 and WebSocket on anyio).
:mod:`.gateway` drives one protocol session per WebSocket connection and
:mod:`.sse` one Server-Sent Events stream per response, both through the
bounded subscriber queue of :mod:`.outbox`; :mod:`.registry` lists the open
sessions; :mod:`.runner` routes requests and runs the server process.
"""
