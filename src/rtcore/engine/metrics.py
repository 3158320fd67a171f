"""Prometheus metrics for ``GET /metrics``, cheap on the hot path.

Why this shape:

* **Recording is plain Python arithmetic.** The node and the session driver
  update ints, floats and :class:`Histogram` bucket lists (one ``bisect`` and
  two additions per observation). prometheus-client's own ``Histogram`` takes a
  lock and walks label dicts on every ``observe``; that is fine for a web
  request and too much on the fan-out path, which runs per subscriber.
* **prometheus-client only at scrape time.** A custom collector reads the
  recorders and a :class:`MetricsSource` (the node's counters plus the
  server's session registry: sessions, subscriptions, outboxes) when
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = ["LATENCY_BUCKETS", "Histogram", "MetricsSource", "NodeMetrics", "SessionStats", "SubscriptionStats", "render"]

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


class SubscriptionStats(Protocol):
    """What the metrics read of one subscription (see :class:`MetricsSource`)."""

    @property
    def stream(self) -> str:
        """The stream."""
        ...

    @property
    def delivered(self) -> int:
        """The last offset queued to the subscriber."""
        ...

    @property
    def acked(self) -> int | None:
        """The last offset the client acknowledged (None: it never acked)."""
        ...

    @property
    def last_sent(self) -> tuple[int, float] | None:
        """``(offset, publish ts)`` of the newest live event queued and not yet acked."""
        ...


class SessionStats(Protocol):
    """What the metrics read of one open session."""

    @property
    def kind(self) -> str:
        """``"websocket"`` or ``"sse"``."""
        ...

    @property
    def subscriptions(self) -> Sequence[SubscriptionStats]:
        """Its subscriptions."""
        ...


class MetricsSource(Protocol):
    """What :func:`render` reads: a node's recorders plus its open sessions.

    The server builds one from its :class:`~rtcore.engine.node.Node` and its
    session registry, so this module depends on neither.
    """

    @property
    def metrics(self) -> NodeMetrics:
        """The recorders."""
        ...

    @property
    def stats(self) -> Mapping[str, int]:
        """Node counters (replays, resumes, idempotent replays, slow consumers)."""
        ...

    @property
    def draining(self) -> bool:
        """Whether the server is shutting down."""
        ...

    @property
    def deliveries(self) -> int:
        """Live events handed to local subscribers so far."""
        ...

    @property
    def clock(self) -> Callable[[], float]:
        """Unix time (the clock ``Event.ts`` uses)."""
        ...

    def session_stats(self) -> Sequence[SessionStats]:
        """The open sessions, now."""
        ...

    def processor_depths(self) -> Iterable[tuple[str, int]]:
        """``(processor, queued events)`` for each local processor."""
        ...


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

    def registry(self, source: MetricsSource) -> CollectorRegistry:
        """This node's own registry (created on first scrape, bound to ``source``)."""
        if self._registry is None:
            from prometheus_client.registry import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_NodeCollector(source))
        return self._registry


class _NodeCollector:
    """Builds every metric family from a node's recorders and live state."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def describe(self) -> Iterable[Any]:
        return []  # collected fresh each scrape; nothing to pre-declare

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        source = self.source
        m: NodeMetrics = source.metrics
        stats = source.stats

        # --- connections and subscriptions -----------------------------------
        sessions = list(source.session_stats())
        websockets = sum(1 for s in sessions if s.kind == "websocket")
        yield GaugeMetricFamily("rtcore_connections", "Open WebSocket sessions.", value=websockets)
        yield GaugeMetricFamily("rtcore_sse_streams", "Open Server-Sent Events streams.", value=len(sessions) - websockets)
        yield CounterMetricFamily("rtcore_connections_opened", "WebSocket sessions started.", value=m.connections_opened)
        closes = CounterMetricFamily("rtcore_connections_closed", "WebSocket sessions ended, by close code.", labels=["code"])
        for code, n in sorted(m.closes.items()):
            closes.add_metric([str(code)], n)
        yield closes
        subs = sum(len(s.subscriptions) for s in sessions)
        yield GaugeMetricFamily("rtcore_subscriptions", "Live subscriptions over all sessions.", value=subs)
        yield GaugeMetricFamily("rtcore_draining", "1 while the server is shutting down.", value=1 if source.draining else 0)

        # --- traffic -------------------------------------------------------------
        yield CounterMetricFamily("rtcore_bytes_received", "WebSocket payload bytes received.", value=m.bytes_in)
        yield CounterMetricFamily("rtcore_bytes_sent", "WebSocket payload bytes sent.", value=m.bytes_out)
        yield CounterMetricFamily("rtcore_messages_received", "WebSocket messages received.", value=m.messages_in)
        yield CounterMetricFamily("rtcore_deliveries", "Live events handed to local subscribers.", value=source.deliveries)

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
            "rtcore_slow_consumer_disconnects", "Subscribers cut for not keeping up (WebSocket close 4008, SSE end).", value=stats.get("slow_consumers", 0)
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

    def _lag(self, sessions: list[SessionStats], m: NodeMetrics) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        now = self.source.clock()
        lag_max = lag_sum = 0
        age_max = 0.0
        unacked_max = 0
        live_streams: set[str] = set()
        for session in sessions:
            for sub in session.subscriptions:
                stream = sub.stream
                live_streams.add(stream)
                delivered = sub.delivered
                head = m.heads.get(stream)
                if head is not None and head[0] > delivered:
                    behind = head[0] - delivered
                    lag_sum += behind
                    lag_max = max(lag_max, behind)
                    last = sub.last_sent
                    # Age of what it has (publish time of its newest queued event), else of the head.
                    ts = last[1] if last is not None else head[1]
                    age_max = max(age_max, now - ts)
                if sub.acked is not None:
                    unacked_max = max(unacked_max, delivered - sub.acked)
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
        depth = GaugeMetricFamily(
            "rtcore_processor_queue_depth", "Events waiting for a local processor (processor lag).", labels=["processor"]
        )
        for name, used in self.source.processor_depths():
            depth.add_metric([name], used)
        yield depth


def render(source: MetricsSource) -> tuple[bytes, str]:
    """The Prometheus text exposition of a node's metrics.

    Args:
        source: The node's recorders and open sessions (the server builds it).

    Returns:
        ``(body, content_type)`` for the ``GET /metrics`` response.
    """
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(source.metrics.registry(source)), CONTENT_TYPE_LATEST
