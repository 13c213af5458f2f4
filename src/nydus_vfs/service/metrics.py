"""The daemon's metrics as the API serves them (nydus-surface.md §3.5, §0 items 6–7), and Prometheus.

Id rules, as upstream's: FS and backend metrics are keyed by the instance's
pseudo mountpoint, blob cache metrics by the config id (``device.id`` in v1,
``id`` in v2).  Without ``?id=`` a family answers only when exactly one
instance exists; otherwise (none, or ambiguous) it is a 404 ``NoCounter``.
"""

from __future__ import annotations

from typing import Any

from ._errors import ServiceError, UnsupportedError

__all__ = ["DaemonMetrics", "NoCounterError"]


class NoCounterError(ServiceError):
    """No counter for the id asked (or none given and not exactly one instance): 404."""

    status = 404

    def __init__(self, wrapper: str) -> None:
        super().__init__("no such counter")
        self._wrapper = wrapper

    @property
    def debug_text(self) -> str:
        return self._wrapper.format("Stats(NoCounter)")


class DaemonMetrics:
    """Read-only views of a :class:`~nydus_vfs.service.daemon.NydusDaemon`'s counters."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon

    def _instance(self, id: str | None, wrapper: str, *, by_config_id: bool = False):
        instances = [i for i in self.daemon.mounts().values() if i.fs_type == "rafs"]
        if id is None:
            if len(instances) != 1:
                raise NoCounterError(wrapper)
            return instances[0]
        for inst in instances:
            key = (inst.config.id if inst.config is not None else "") if by_config_id else inst.mountpoint
            if key == id:
                return inst
        raise NoCounterError(wrapper)

    def fs(self, id: str | None) -> dict[str, Any]:
        return self._instance(id, "Metrics({})").metrics.to_json()

    def files(self, id: str | None, *, latest: bool = False) -> Any:
        m = self._instance(id, "Metrics({})").metrics
        return m.take_latest() if latest else m.files_json()

    def pattern(self, id: str | None) -> list[dict[str, Any]]:
        return self._instance(id, "Pattern(Metrics({}))").metrics.pattern_json()

    def backend(self, id: str | None) -> dict[str, Any]:
        inst = self._instance(id, "Metrics({})")
        return inst.fs.device.backend.metrics.to_dict()

    def blobcache(self, id: str | None) -> dict[str, Any]:
        inst = self._instance(id, "Metrics({})", by_config_id=True)
        return inst.fs.device.metrics_json(inst.config.id if inst.config is not None else "")

    def inflight(self) -> list[dict[str, Any]]:
        if self.daemon.fuse_session is None:
            raise UnsupportedError("in-flight requests are tracked for FUSE sessions only")
        return self.daemon.fuse_session.server.inflight()

    def prometheus(self) -> bytes:
        """All families in the Prometheus text format, labelled by instance id."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from ..fs.metrics import FOPS

        class _Collector:
            def __init__(self, metrics: DaemonMetrics) -> None:
                self.metrics = metrics

            def collect(self):
                d = self.metrics.daemon
                up = GaugeMetricFamily("nydusd_state", "Daemon lifecycle state (1 for the current one)",
                                       labels=["state"])
                for s in ("INIT", "READY", "RUNNING", "STOPPED"):
                    up.add_metric([s], 1.0 if d.state.value == s else 0.0)
                yield up
                hits = CounterMetricFamily("nydusd_fop_hits", "FUSE operations served", labels=["id", "fop"])
                errs = CounterMetricFamily("nydusd_fop_errors", "FUSE operations failed", labels=["id", "fop"])
                data = CounterMetricFamily("nydusd_data_read_bytes", "Bytes read by FUSE READs", labels=["id"])
                bread = CounterMetricFamily("nydusd_backend_read_bytes", "Bytes read from the backend",
                                            labels=["id", "backend_type"])
                bcount = CounterMetricFamily("nydusd_backend_reads", "Backend read requests",
                                             labels=["id", "backend_type"])
                berr = CounterMetricFamily("nydusd_backend_read_errors", "Failed backend reads",
                                           labels=["id", "backend_type"])
                for path, inst in sorted(d.mounts().items()):
                    if inst.fs_type != "rafs":
                        continue
                    m = inst.metrics
                    for i, fop in enumerate(FOPS):
                        hits.add_metric([path, fop], m.fop_hits[i])
                        errs.add_metric([path, fop], m.fop_errors[i])
                    data.add_metric([path], m.data_read)
                    b = inst.fs.device.backend.metrics.to_dict()
                    bread.add_metric([path, b["backend_type"]], b["read_amount_total"])
                    bcount.add_metric([path, b["backend_type"]], b["read_count"])
                    berr.add_metric([path, b["backend_type"]], b["read_errors"])
                yield from (hits, errs, data, bread, bcount, berr)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return generate_latest(registry)
