"""What the relay counts, on /metrics (Prometheus text format)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from protocol.link import LinkFrame


class Metrics:
    """The relay's counters and gauges, in a registry of their own (one per relay)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connected = Gauge("kmsnet_relay_connected_nodes", "Authenticated connections", registry=r)
        self.frames = Counter("kmsnet_relay_frames_total", "Frames received, by type", ["type"], registry=r)
        self.refused = Counter("kmsnet_relay_refused_total", "Frames or connections refused", ["reason"], registry=r)
        self.stored = Counter("kmsnet_relay_envelopes_stored_total", "Envelopes stored durably", registry=r)
        self.delivered = Counter("kmsnet_relay_envelopes_delivered_total", "Envelopes pushed to nodes", registry=r)
        self.resent = Counter(
            "kmsnet_relay_envelopes_resent_total",
            "Envelopes pushed again on a live connection for want of an ACK",
            registry=r,
        )
        self.acked = Counter("kmsnet_relay_envelopes_acked_total", "Envelopes acknowledged and deleted", registry=r)
        self.store_up = Gauge("kmsnet_relay_store_up", "1 while the store answers (Redis reachable)", registry=r)
        self.write_refused = Counter(
            "kmsnet_relay_store_write_refused_total",
            "Writes the store refused (full, read-only), by what was to be written",
            ["what"],
            registry=r,
        )
        self.writable = Gauge("kmsnet_relay_store_writable", "0 since the store last refused a write", registry=r)
        self.writable.set(1)
        self.replaced = Counter(
            "kmsnet_relay_replaced_total", "Connections closed for a newer one of the same node", registry=r
        )
        # labels() costs a lookup under a lock: one child per frame type, looked up once.
        self._received: dict[type[LinkFrame], Counter] = {}

    def received(self, frame: LinkFrame) -> None:
        """Count a frame received from a node."""
        kind = type(frame)
        child = self._received.get(kind)
        if child is None:
            child = self._received[kind] = self.frames.labels(kind.__name__)
        child.inc()
