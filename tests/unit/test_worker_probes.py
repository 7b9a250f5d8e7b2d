"""The worker's probe server (/metrics, /healthz, /readyz), its GPU metrics and the image's healthcheck."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from ldm_serve import healthcheck
from worker.gpu_metrics import GpuCollector, register_gpu_metrics
from worker.probes import ProbeServer


@pytest.fixture
def server():
    registry = CollectorRegistry()
    Counter("ldm_probe_test_total", "a counter", registry=registry).inc(3)
    ready = threading.Event()
    srv = ProbeServer(registry, ready.is_set).start()
    try:
        yield srv, ready
    finally:
        srv.stop()


def test_probe_server_serves_metrics_and_follows_readiness(server) -> None:
    srv, ready = server
    base = f"http://127.0.0.1:{srv.port}"
    metrics = httpx.get(f"{base}/metrics")
    assert metrics.status_code == 200 and "ldm_probe_test_total 3.0" in metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    not_ready = httpx.get(f"{base}/readyz")
    assert not_ready.status_code == 503 and not_ready.json()["status"] == "not_ready"
    ready.set()
    assert httpx.get(f"{base}/readyz").status_code == 200
    ready.clear()  # SIGTERM: draining workers leave the endpoints
    assert httpx.get(f"{base}/readyz").status_code == 503
    assert httpx.get(f"{base}/nope").status_code == 404


def test_healthcheck_probes_the_role_port(server) -> None:
    srv, ready = server
    assert healthcheck.probe_url({}) == "http://127.0.0.1:8000/readyz"
    assert healthcheck.probe_url({"LDM_PORT": "9000"}) == "http://127.0.0.1:9000/readyz"
    worker_env = {"LDM_PORT": "8000", "LDM_WORKER_METRICS_PORT": str(srv.port)}
    assert healthcheck.probe_url(worker_env) == f"http://127.0.0.1:{srv.port}/readyz"
    assert healthcheck.main(worker_env) == 1
    ready.set()
    assert healthcheck.main(worker_env) == 0
    srv.stop()
    assert healthcheck.main(worker_env) == 1  # nothing listens


class _Cuda:
    """Stand-in for torch.cuda (no GPU here): fixed allocator figures per device."""

    def memory_allocated(self, index: int) -> int:
        return 1000 + index

    def memory_reserved(self, index: int) -> int:
        return 4096

    def current_device(self) -> int:
        return 0


class _Nvml:
    """Stand-in for pynvml."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802 - pynvml's names
        return f"h{index}"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:  # noqa: N802
        if self.fail:
            raise RuntimeError("NVML: GPU is lost")
        return SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=2**30, total=2**34, free=2**34 - 2**30)


def _sample(registry: CollectorRegistry, name: str, device: str) -> float | None:
    return registry.get_sample_value(name, {"device": device})


def test_gpu_metrics_are_a_no_op_on_cpu() -> None:
    registry = CollectorRegistry()
    assert register_gpu_metrics(registry, "cpu", cuda=_Cuda(), nvml=_Nvml()) is False
    assert b"ldm_gpu" not in generate_latest(registry)


def test_gpu_metrics_from_torch_and_nvml() -> None:
    registry = CollectorRegistry()
    assert register_gpu_metrics(registry, "cuda:1", cuda=_Cuda(), nvml=_Nvml()) is True
    assert _sample(registry, "ldm_gpu_memory_allocated_bytes", "1") == 1001
    assert _sample(registry, "ldm_gpu_memory_reserved_bytes", "1") == 4096
    assert _sample(registry, "ldm_gpu_utilization_ratio", "1") == pytest.approx(0.37)
    assert _sample(registry, "ldm_gpu_memory_used_bytes", "1") == 2**30
    assert _sample(registry, "ldm_gpu_memory_total_bytes", "1") == 2**34


def test_gpu_metrics_without_nvml_or_with_a_failing_read() -> None:
    registry = CollectorRegistry()
    register_gpu_metrics(registry, "cuda", cuda=_Cuda(), nvml=None)  # "cuda": the current device
    assert _sample(registry, "ldm_gpu_memory_allocated_bytes", "0") == 1000
    assert _sample(registry, "ldm_gpu_utilization_ratio", "0") is None
    failing = CollectorRegistry()
    failing.register(GpuCollector(_Cuda(), 0, _Nvml(fail=True)))
    text = generate_latest(failing).decode()  # the scrape still answers, with the torch figures
    assert "ldm_gpu_memory_allocated_bytes" in text and "ldm_gpu_utilization_ratio" not in text


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_gpu_metrics_on_a_real_gpu() -> None:
    import torch

    registry = CollectorRegistry()
    assert register_gpu_metrics(registry, "cuda:0")
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda:0")
    assert _sample(registry, "ldm_gpu_memory_allocated_bytes", "0") >= x.numel()
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return
    ratio = _sample(registry, "ldm_gpu_utilization_ratio", "0")
    assert ratio is not None and 0.0 <= ratio <= 1.0


def test_compose_passes_an_unset_webhook_secret_as_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    from ldm_serve.settings import Settings

    monkeypatch.setenv("LDM_WEBHOOK_SECRET", "")  # docker compose: ${LDM_WEBHOOK_SECRET:-}
    assert Settings().webhook_secret is None
    monkeypatch.setenv("LDM_WEBHOOK_SECRET", "not-a-secret")
    with pytest.raises(ValueError, match="whsec_"):
        Settings()
