"""GPU metrics of a CUDA worker, read when Prometheus scrapes (no polling thread).

``ldm_gpu_memory_allocated_bytes`` / ``ldm_gpu_memory_reserved_bytes`` come from
``torch.cuda`` (this process's tensors and its caching allocator);
``ldm_gpu_utilization_ratio`` (0-1) and ``ldm_gpu_memory_used_bytes`` /
``ldm_gpu_memory_total_bytes`` (the whole device, every process) come from NVML
when ``pynvml`` (the ``nvidia-ml-py`` package) is installed. On a CPU worker
nothing is registered and nothing is exported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class GpuCollector(Collector):
    """Collect per-device GPU gauges at scrape time.

    Args:
        cuda: the ``torch.cuda`` module (or an object with its ``memory_allocated`` /
            ``memory_reserved`` functions).
        device_index: the CUDA device this worker runs on.
        nvml: the ``pynvml`` module, initialised, or ``None`` (no utilisation metrics).
    """

    def __init__(self, cuda: Any, device_index: int, nvml: Any = None) -> None:
        self.cuda = cuda
        self.index = device_index
        self.nvml = nvml
        self._handle = nvml.nvmlDeviceGetHandleByIndex(device_index) if nvml is not None else None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        label = [str(self.index)]
        allocated = GaugeMetricFamily(
            "ldm_gpu_memory_allocated_bytes", "GPU memory held by this worker's tensors (torch)", labels=["device"]
        )
        allocated.add_metric(label, float(self.cuda.memory_allocated(self.index)))
        reserved = GaugeMetricFamily(
            "ldm_gpu_memory_reserved_bytes", "GPU memory reserved by this worker's caching allocator (torch)",
            labels=["device"],
        )
        reserved.add_metric(label, float(self.cuda.memory_reserved(self.index)))
        yield allocated
        yield reserved
        if self._handle is None:
            return
        try:
            util = self.nvml.nvmlDeviceGetUtilizationRates(self._handle)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except Exception as exc:  # noqa: BLE001 - a failing NVML read must not break the scrape
            log.warning("NVML read failed: %s", exc)
            return
        ratio = GaugeMetricFamily(
            "ldm_gpu_utilization_ratio", "Fraction of time the GPU ran kernels over the last sample period (NVML)",
            labels=["device"],
        )
        ratio.add_metric(label, util.gpu / 100.0)
        used = GaugeMetricFamily(
            "ldm_gpu_memory_used_bytes", "GPU memory used on the device by every process (NVML)", labels=["device"]
        )
        used.add_metric(label, float(mem.used))
        total = GaugeMetricFamily("ldm_gpu_memory_total_bytes", "GPU memory of the device (NVML)", labels=["device"])
        total.add_metric(label, float(mem.total))
        yield ratio
        yield used
        yield total


def _load_nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver library: memory metrics only
        log.info("NVML unavailable (%s): no GPU utilisation metrics", exc)
        return None
    return pynvml


def register_gpu_metrics(registry: CollectorRegistry, device: Any, cuda: Any = None, nvml: Any = "auto") -> bool:
    """Register a :class:`GpuCollector` when ``device`` is a CUDA device; a no-op (False) otherwise.

    ``cuda`` defaults to ``torch.cuda``; ``nvml="auto"`` loads ``pynvml`` if installed.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return False
    cuda = cuda if cuda is not None else torch.cuda
    index = device.index if device.index is not None else cuda.current_device()
    registry.register(GpuCollector(cuda, index, _load_nvml() if nvml == "auto" else nvml))
    return True
