"""Prometheus metrics for ``GET /metrics``, cheap on the hot path.

Why this shape:

* **Recording is plain Python arithmetic.** The node and the session driver
  update ints, floats and :class:`Histogram` bucket lists (one ``bisect`` and
  two additions per observation). prometheus-client's own ``Histogram`` takes a
  lock and walks label dicts on every ``observe``; that is fine for a web
  request and too much on the fan-out path, which runs per subscriber.
* **prometheus-client only at scrape time.** A custom collector reads the
  recorders and the node's live objects (sessions, subscriptions, hub) when
  Prometheus scrapes, and builds the metric families then. Gauges such as
  connections, subscriptions and subscriber lag are computed from the live
  state instead of being kept up to date on every change.
* **One registry per node.** :func:`render` uses a ``CollectorRegistry`` owned
  by the node's :class:`NodeMetrics`, never the process-global registry, so a
  test process with many nodes (or two servers in one process) never sees
  "duplicated timeseries" errors and each server reports only its own node.

What is observed, and how often (the costs we chose):

* ``rtcore_message_latency_seconds{stage="written"}``: publish (the event's
  ``ts``) → the socket write that carried it, **once per write per
  connection** for the oldest live event in that write (the worst case of the
  batch), not once per event. Replayed history is excluded (its age is not
  latency).
* ``rtcore_message_latency_seconds{stage="acked"}``: publish → the client's
  ``ack`` covering the newest event the connection was sent (once per such
  ack; acks of older offsets are not timed because their publish time is not
  kept per event).
* ``rtcore_event_dispatch_lag_seconds``: append → fanned out to this node's
  subscribers (the event-log queue delay as this node sees it), once per
  event, not per subscriber.
* ``rtcore_command_duration_seconds{command,outcome}``: command handling time
  on the WebSocket and HTTP APIs; ``outcome`` is ``ok`` or the error code.
  Names that are not registered commands are reported as ``_unknown`` so a
  client cannot create label values at will.
* Subscriber lag (synchronization delay) is computed at scrape time over every
  subscription: offsets the node has dispatched for the stream but not yet
  queued to the connection (max and sum), the age of the newest event queued
  to a lagging subscriber, and offsets delivered but not yet acknowledged by
  clients that ack.

Timestamps come from the node's clock (Unix seconds, what ``Event.ts`` uses);
durations from ``time.perf_counter``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from .node import Node

__all__ = ["LATENCY_BUCKETS", "Histogram", "NodeMetrics", "render"]

#: Bucket upper bounds (seconds) for latencies: 250 µs to 10 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_UNKNOWN_COMMAND = "_unknown"


class Histogram:
    """A lock-free histogram recorder (buckets as plain ints).

    Args:
        bounds: Increasing bucket upper bounds; ``+Inf`` is implied.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one value (negative values, from clock skew, count as 0)."""
        if value < 0.0:
            value = 0.0
        # bisect_left: the first bound >= value, i.e. Prometheus' "le" bucket.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` pairs in exposition order, ending with ``+Inf``."""
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            total += n
            out.append((_fmt(bound), float(total)))
        out.append(("+Inf", float(self.count)))
        return out


def _fmt(bound: float) -> str:
    return repr(float(bound))


class NodeMetrics:
    """Counters and histograms one node records; read by :func:`render`.

    Attributes:
        written: Publish → written to a socket.
        acked: Publish → acknowledged by the client.
        dispatch: Append → fanned out on this node.
        commands: Command durations by ``(command, outcome)``.
        bytes_in: WebSocket payload bytes received.
        bytes_out: WebSocket payload bytes sent.
        messages_in: WebSocket messages received.
        connections_opened: Sessions started.
        closes: Sessions ended, by WebSocket close code.
        heads: Last dispatched ``(offset, ts)`` per stream with local subscribers.
    """

    def __init__(self) -> None:
        self.written = Histogram()
        self.acked = Histogram()
        self.dispatch = Histogram()
        self.commands: dict[tuple[str, str], Histogram] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.messages_in = 0
        self.connections_opened = 0
        self.closes: dict[int, int] = {}
        self.heads: dict[str, tuple[int, float]] = {}
        self._registry: CollectorRegistry | None = None

    def command(self, known: bool, name: str, outcome: str, seconds: float) -> None:
        """Record one command's duration."""
        key = (name if known else _UNKNOWN_COMMAND, outcome)
        hist = self.commands.get(key)
        if hist is None:
            hist = self.commands[key] = Histogram()
        hist.observe(seconds)

    def closed(self, code: int) -> None:
        """Count a session's end by close code."""
        self.closes[code] = self.closes.get(code, 0) + 1

    def registry(self, node: Node) -> CollectorRegistry:
        """This node's own registry (created on first scrape)."""
        if self._registry is None:
            from prometheus_client.registry import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_NodeCollector(node))
        return self._registry


class _NodeCollector:
    """Builds every metric family from a node's recorders and live state."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def describe(self) -> Iterable[Any]:
        return []  # collected fresh each scrape; nothing to pre-declare

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        node = self.node
        m: NodeMetrics = node.metrics
        stats = node.stats

        # --- connections and subscriptions -----------------------------------
        sessions = list(node.sessions)
        yield GaugeMetricFamily("rtcore_connections", "Open WebSocket sessions.", value=len(sessions))
        yield CounterMetricFamily("rtcore_connections_opened", "WebSocket sessions started.", value=m.connections_opened)
        closes = CounterMetricFamily("rtcore_connections_closed", "WebSocket sessions ended, by close code.", labels=["code"])
        for code, n in sorted(m.closes.items()):
            closes.add_metric([str(code)], n)
        yield closes
        subs = [sub for conn in sessions for sub in getattr(conn, "subs", {}).values()]
        yield GaugeMetricFamily("rtcore_subscriptions", "Live subscriptions over all sessions.", value=len(subs))
        yield GaugeMetricFamily("rtcore_draining", "1 while the server is shutting down.", value=1 if node.draining else 0)

        # --- traffic -------------------------------------------------------------
        yield CounterMetricFamily("rtcore_bytes_received", "WebSocket payload bytes received.", value=m.bytes_in)
        yield CounterMetricFamily("rtcore_bytes_sent", "WebSocket payload bytes sent.", value=m.bytes_out)
        yield CounterMetricFamily("rtcore_messages_received", "WebSocket messages received.", value=m.messages_in)
        hub = node.hub
        if hub is not None:
            yield CounterMetricFamily("rtcore_deliveries", "Live events handed to local subscribers.", value=hub.delivered)

        # --- subscriptions, recovery, idempotency, slow consumers --------------
        yield CounterMetricFamily("rtcore_replays", "Subscriptions that replayed history.", value=stats.get("replays", 0))
        resumes = CounterMetricFamily(
            "rtcore_resumes", "Subscriptions that asked to resume, by whether history covered them.", labels=["recovered"]
        )
        resumes.add_metric(["true"], stats.get("recovered", 0))
        resumes.add_metric(["false"], stats.get("not_recovered", 0))
        yield resumes
        yield CounterMetricFamily(
            "rtcore_idempotent_replays", "Commands answered from the idempotency store.", value=stats.get("idempotent_replays", 0)
        )
        yield CounterMetricFamily(
            "rtcore_slow_consumer_disconnects", "Sessions cut for not keeping up (close 4008).", value=stats.get("slow_consumers", 0)
        )

        # --- latency histograms ----------------------------------------------
        latency = HistogramMetricFamily(
            "rtcore_message_latency_seconds", "Publish to written (per socket write) and to acknowledged.", labels=["stage"]
        )
        latency.add_metric(["written"], m.written.cumulative(), m.written.sum)
        latency.add_metric(["acked"], m.acked.cumulative(), m.acked.sum)
        yield latency
        dispatch = HistogramMetricFamily(
            "rtcore_event_dispatch_lag_seconds", "Append to fan-out on this node (event log queue delay)."
        )
        dispatch.add_metric([], m.dispatch.cumulative(), m.dispatch.sum)
        yield dispatch
        commands = HistogramMetricFamily(
            "rtcore_command_duration_seconds", "Command handling time (WebSocket and HTTP).", labels=["command", "outcome"]
        )
        for (name, outcome), hist in sorted(m.commands.items()):
            commands.add_metric([name, outcome], hist.cumulative(), hist.sum)
        yield commands

        # --- synchronization delay (computed now) ------------------------------
        yield from self._lag(sessions, m)
        yield from self._processors()

    def _lag(self, sessions: list[Any], m: NodeMetrics) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        now = self.node.clock()
        lag_max = lag_sum = 0
        age_max = 0.0
        unacked_max = 0
        live_streams: set[str] = set()
        for conn in sessions:
            acked: dict[str, int] = getattr(conn, "acked", {})
            sent: dict[str, tuple[int, float]] = getattr(conn, "last_sent", {})
            for stream, sub in getattr(conn, "subs", {}).items():
                live_streams.add(stream)
                delivered = sub.tail.delivery.last
                head = m.heads.get(stream)
                if head is not None and head[0] > delivered:
                    behind = head[0] - delivered
                    lag_sum += behind
                    lag_max = max(lag_max, behind)
                    last = sent.get(stream)
                    # Age of what it has (publish time of its newest queued event), else of the head.
                    ts = last[1] if last is not None else head[1]
                    age_max = max(age_max, now - ts)
                if stream in acked:
                    unacked_max = max(unacked_max, delivered - acked[stream])
        # Forget heads of streams nobody here follows any more (bounded memory).
        for stream in [s for s in m.heads if s not in live_streams]:
            del m.heads[stream]
        yield GaugeMetricFamily(
            "rtcore_subscriber_lag_offsets_max", "Most events any subscriber is behind this node's head.", value=lag_max
        )
        yield GaugeMetricFamily(
            "rtcore_subscriber_lag_offsets_sum", "Events behind the head, summed over subscribers.", value=lag_sum
        )
        yield GaugeMetricFamily(
            "rtcore_subscriber_lag_seconds_max", "Age of the newest event delivered to the most lagging subscriber.", value=age_max
        )
        yield GaugeMetricFamily(
            "rtcore_subscriber_unacked_offsets_max",
            "Most events delivered but not acknowledged (clients that ack).",
            value=unacked_max,
        )

    def _processors(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        # Local processors read from a bounded queue; its depth is their lag.
        # Read defensively: the processors module owns that structure.
        queues = getattr(getattr(self.node, "_processors", None), "_queues", None) or []
        depth = GaugeMetricFamily(
            "rtcore_processor_queue_depth", "Events waiting for a local processor (processor lag).", labels=["processor"]
        )
        for spec, send in queues:
            try:
                used = send.statistics().current_buffer_used
            except Exception:  # pragma: no cover - structure changed
                continue
            depth.add_metric([getattr(spec.handler, "__qualname__", "?")], used)
        yield depth


def render(node: Node) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``node``'s metrics.

    Args:
        node: A running node.

    Returns:
        ``(body, content_type)`` for the ``GET /metrics`` response.
    """
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(node.metrics.registry(node)), CONTENT_TYPE_LATEST
