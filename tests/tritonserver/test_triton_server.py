"""A real ``tritonserver`` loads the model repositories ``ldm-serve export-triton`` writes, and its
images are bit-identical to ``ldm-serve generate`` / ``inpaint`` for the same seeds and settings.

One server, three models, over KServe v2 (``tritonclient``):

* ``shapes-ldm-f4``: the committed ``model_repository/`` as it is (eager, the bundled model by reference);
* ``ldm-torchscript``: a fresh self-contained export of the bundled model with ``--backend torchscript``
  (weights and TorchScript files inside the repository), with a long batching window and a maximum
  batch of exactly the rows sent below, so that the concurrent requests reach ``execute`` together;
* ``ldm-inpaint``: an export of a tiny random inpainting checkpoint (``IMAGE`` + ``MASK`` inputs).

Concurrent requests with different prompts, seeds, steps and guidance go through each
text-to-image model; every image must equal the in-process one (batch invariance across the
Triton boundary), and a request with a bad row fails alone with a 400 naming the input.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serving_support import free_port, stop_process, wait_until
from tools.tritonserver_local import start_tritonserver

pytestmark = [pytest.mark.triton, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = "shapes-ldm-f4"
TS_MODEL = "ldm-torchscript"
INPAINT_MODEL = "ldm-inpaint"


@dataclass(frozen=True)
class Group:
    """Rows sharing prompt and settings (one ``ldm-serve generate --n`` call); seeds ``seed, seed + 1, ...``."""

    prompt: str
    negative: str
    steps: int
    guidance: float
    seed: int
    n: int


GROUPS = (
    Group("a red circle on a white background", "", 10, 5.0, 11, 3),
    Group("a small blue square", "green", 6, 2.5, 40, 3),
)
# requests as (group, first row, rows): one two-row request, the rest one row each
REQUESTS = ((0, 0, 2), (0, 2, 1), (1, 0, 1), (1, 1, 1), (1, 2, 1))
ROWS_SENT = sum(r[2] for r in REQUESTS) + 1  # and one bad one-row request


def _env(cache: Path) -> dict[str, str]:
    """One environment for the server and the in-process reference: same threads, no network."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "REDIS_URL")}
    env["XDG_CACHE_HOME"] = str(cache)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _cli(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", "launcher", *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, f"ldm-serve {args[0]} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@dataclass
class Server:
    http: str
    tmp: Path
    env: dict[str, str]
    inpaint_checkpoint: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    import tritonclient.http as httpclient

    from tests.checkpoints import TINY_SD1_INPAINT, write_original_checkpoint

    tmp = tmp_path_factory.mktemp("triton")
    env = _env(tmp / "cache")
    repo = tmp / "repo"
    # max batch = the 7 rows _send_concurrently sends: the batcher dispatches them together as soon as all
    # have arrived, and the long window only matters if one straggles
    _cli(["export-triton", "--out", str(repo), "--name", TS_MODEL, "--backend", "torchscript",
          "--max-batch-size", str(ROWS_SENT), "--queue-delay-ms", "30000"], env)  # fmt: skip
    ckpt = write_original_checkpoint(TINY_SD1_INPAINT, tmp / "inpaint" / "tiny-inpaint.ckpt")
    _cli(["export-triton", "--out", str(repo), "--name", INPAINT_MODEL, "--model", str(ckpt)], env)
    ports = [free_port() for _ in range(3)]
    proc = start_tritonserver([ROOT / "model_repository", repo], tmp, http_port=ports[0], grpc_port=ports[1],
                              metrics_port=ports[2], env=env, log_path=tmp / "tritonserver.log")  # fmt: skip
    url = f"127.0.0.1:{ports[0]}"
    client = httpclient.InferenceServerClient(url)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"tritonserver exited:\n{(tmp / 'tritonserver.log').read_text()[-4000:]}")
        try:
            return client.is_server_ready() and all(
                client.is_model_ready(m) for m in (COMMITTED, TS_MODEL, INPAINT_MODEL)
            )
        except Exception:  # noqa: BLE001 - not listening yet
            return False

    try:
        wait_until(ready, 300, "tritonserver ready with every model", interval_s=0.5)
        yield Server(url, tmp, env, ckpt)
    finally:
        client.close()
        stop_process(proc, timeout_s=30)


def _inputs(rows: list[dict]) -> list:
    import tritonclient.http as httpclient

    def make(name: str, values: list, dtype: str, np_dtype: object) -> httpclient.InferInput:
        arr = np.array([[v] for v in values], dtype=np_dtype)
        tensor = httpclient.InferInput(name, list(arr.shape), dtype)
        tensor.set_data_from_numpy(arr)
        return tensor

    return [
        make("PROMPT", [r["prompt"].encode() for r in rows], "BYTES", object),
        make("NEGATIVE_PROMPT", [r["negative"].encode() for r in rows], "BYTES", object),
        make("SEED", [r["seed"] for r in rows], "INT64", np.int64),
        make("STEPS", [r["steps"] for r in rows], "INT32", np.int32),
        make("GUIDANCE_SCALE", [r["guidance"] for r in rows], "FP32", np.float32),
    ]


def _rows(group: int, first: int, count: int) -> list[dict]:
    g = GROUPS[group]
    return [{"prompt": g.prompt, "negative": g.negative, "steps": g.steps, "guidance": g.guidance,
             "seed": g.seed + first + i} for i in range(count)]  # fmt: skip


def _references(server: Server, backend: str) -> list[list[np.ndarray]]:
    """Per group, the images of ``ldm-serve generate`` (one process, the same seeds)."""
    out = []
    for k, g in enumerate(GROUPS):
        target = server.tmp / f"ref-{backend}-{k}.png"
        _cli(["generate", "--prompt", g.prompt, "--negative-prompt", g.negative, "--n", str(g.n),
              "--seed", str(g.seed), "--steps", str(g.steps), "--guidance-scale", str(g.guidance),
              "--backend", backend, "--out", str(target)], server.env)  # fmt: skip
        out.append([np.asarray(Image.open(target.with_name(f"{target.stem}-{i}.png")).convert("RGB"))
                    for i in range(g.n)])  # fmt: skip
    return out


def _send_concurrently(server: Server, model: str) -> list:
    """Every request of ``REQUESTS`` plus one with STEPS=0, at once, one client per thread."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    jobs = [_rows(*r) for r in REQUESTS] + [[{**_rows(0, 0, 1)[0], "steps": 0}]]

    def one(rows: list[dict]) -> object:
        client = httpclient.InferenceServerClient(server.http, network_timeout=600.0, connection_timeout=60.0)
        try:
            return client.infer(model, _inputs(rows), timeout=600_000_000).as_numpy("IMAGE")
        except InferenceServerException as exc:
            return exc
        finally:
            client.close()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


@pytest.mark.parametrize(("model", "backend"), [(COMMITTED, "eager"), (TS_MODEL, "torchscript")])
def test_images_equal_ldm_serve_generate(server: Server, model: str, backend: str) -> None:
    results = _send_concurrently(server, model)
    *good, bad = results
    assert "STEPS" in str(bad) and "must be an integer in [1, 1000]" in str(bad), bad
    references = _references(server, backend)
    for (group, first, count), images in zip(REQUESTS, good, strict=True):
        assert isinstance(images, np.ndarray), images
        assert images.dtype == np.uint8 and images.shape == (count, 64, 64, 3)
        for i in range(count):
            expected = references[group][first + i]
            assert np.array_equal(images[i], expected), (
                f"{model}: group {group} seed {GROUPS[group].seed + first + i}: max abs diff "
                f"{np.abs(images[i].astype(int) - expected.astype(int)).max()}"
            )


def test_dynamic_batching_runs_requests_together(server: Server) -> None:
    """The long batching window of ``ldm-torchscript`` puts concurrent requests into one ``execute``."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http)
    try:
        _send_concurrently(server, TS_MODEL)
        stats = client.get_inference_statistics(TS_MODEL)["model_stats"][0]
        config = client.get_model_config(TS_MODEL)
    finally:
        client.close()
    assert config["max_batch_size"] == ROWS_SENT and "dynamic_batching" in config
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    sizes = [int(b["batch_size"]) for b in stats["batch_stats"]]
    assert max(sizes) > 1, stats["batch_stats"]


def test_inpainting_model_equals_ldm_serve_inpaint(server: Server) -> None:
    import tritonclient.http as httpclient

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    image_path, mask_path = server.tmp / "source.png", server.tmp / "mask.png"
    Image.fromarray(image).save(image_path)
    Image.fromarray(mask).save(mask_path)
    target = server.tmp / "inpainted.png"
    _cli(["inpaint", "--model", str(server.inpaint_checkpoint), "--image", str(image_path), "--mask", str(mask_path),
          "--prompt", "a cat", "--seed", "7", "--steps", "4", "--guidance-scale", "3", "--out", str(target)],
         server.env)  # fmt: skip
    expected = np.asarray(Image.open(io.BytesIO(target.read_bytes())).convert("RGB"))

    inputs = _inputs([{"prompt": "a cat", "negative": "", "seed": 7, "steps": 4, "guidance": 3.0}])
    for name, arr in (("IMAGE", image[None]), ("MASK", mask[None])):
        tensor = httpclient.InferInput(name, list(arr.shape), "UINT8")
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    client = httpclient.InferenceServerClient(server.http, network_timeout=600.0)
    try:
        got = client.infer(INPAINT_MODEL, inputs).as_numpy("IMAGE")
    finally:
        client.close()
    assert got.shape == (1, 64, 64, 3)
    assert np.array_equal(got[0], expected)


def test_exported_config_parses_as_triton_model_config() -> None:
    """``config.pbtxt`` and ``configs/cpu.pbtxt`` are valid ``inference.ModelConfig`` text (Triton's own proto)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for path in sorted((ROOT / "model_repository").glob("*/config*.pbtxt")) + sorted(
        (ROOT / "model_repository").glob("*/configs/*.pbtxt")
    ):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.backend == "python" and config.max_batch_size == 8, path
        assert config.HasField("dynamic_batching"), path
        assert [o.name for o in config.output] == ["IMAGE"]
        assert {p for p in config.parameters} >= {"LDM_MODEL", "LDM_BACKEND"}
