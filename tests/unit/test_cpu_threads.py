"""``OMP_WAIT_POLICY`` for core-worker processes: set before torch loads, never over an explicit value."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, os, sys
from ldm_serve.cpu_threads import quiet_openmp_for_core_workers
args = json.loads(sys.argv[1])
if args.pop("torch_first"):
    import torch  # noqa: F401
changed = quiet_openmp_for_core_workers(args["device"], args["core_workers"])
print(json.dumps({"changed": changed, "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


def probe(device: str, core_workers: int | None, *, env_policy: str | None = None, torch_first: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    args = json.dumps({"device": device, "core_workers": core_workers, "torch_first": torch_first})
    out = subprocess.run([sys.executable, "-c", PROBE, args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("device", "workers", "env_policy", "torch_first", "want"),
    [
        ("cpu", None, None, False, {"changed": True, "policy": "PASSIVE"}),
        ("cpu", 4, None, False, {"changed": True, "policy": "PASSIVE"}),
        ("cpu", 1, None, False, {"changed": False, "policy": None}),  # one call uses every thread
        ("cuda", None, None, False, {"changed": False, "policy": None}),
        ("cpu", None, "ACTIVE", False, {"changed": False, "policy": "ACTIVE"}),  # the operator's choice wins
        ("cpu", None, None, True, {"changed": False, "policy": None}),  # too late once torch is loaded
    ],
)
def test_wait_policy(device: str, workers: int | None, env_policy: str | None, torch_first: bool, want: dict) -> None:
    assert probe(device, workers, env_policy=env_policy, torch_first=torch_first) == want


def test_worker_sets_the_policy_before_it_loads_torch(tmp_path) -> None:
    """``load_model`` in a fresh worker process: OpenMP sees PASSIVE, and the model runs with core workers."""
    from ldm.random_model import write_random_model

    ckpt = write_random_model(tmp_path / "model")
    script = f"""
import os, sys
from ldm_serve.settings import Settings
from worker.main import load_model
assert "torch" not in sys.modules
pipe = load_model(Settings(model_path={str(ckpt)!r}, backend="eager"))
print(os.environ.get("OMP_WAIT_POLICY"), pipe.core_pool is not None)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = "2"  # so that the default core_workers is 2 even on a 1-core runner
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "PASSIVE True"
