"""``ldm-serve client`` as a subprocess against a live server: images with their seeds in the file
names, progress from the event stream (queue position, steps), a 4xx's message and exit code,
``--no-wait`` / ``watch`` / ``jobs`` / ``models``, and Ctrl-C (asked, answered on stdin, or
``--cancel-on-interrupt``) cancelling the job on the server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import COMMON, Service, start_gateway
from tests.serving_support import ROOT, child_env, stop_process, wait_until

pytestmark = pytest.mark.integration

KEY = "cli-test-key"
FAST = ["--steps", "4", "--guidance-scale", "3", "--width", "64", "--height", "64"]


def run_client(args: list[str], env: dict[str, str] | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", "client", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT, env=env)


class LiveClient:
    """A client subprocess whose stdout and stderr are read as they come (to time a SIGINT)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "client", *args], cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:
        for chunk in iter(lambda: stream.read(1), ""):
            sink.append(chunk)

    def stdout(self) -> str:
        return "".join(self.out)

    def stderr(self) -> str:
        return "".join(self.err)

    def finish(self, timeout_s: float = 60) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def queued_only(integration_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A gateway with an API key and no worker: jobs stay queued until canceled."""
    logs = tmp_path_factory.mktemp("cli-keyed-logs")
    env = child_env(redis_url=integration_redis, redis_prefix="itcli", default_model="ghost", api_keys=KEY,
                    **COMMON)
    url, gateway = start_gateway(logs, env, "cli-gateway")
    try:
        yield Service(url, "itcli", env, logs, [gateway])
    finally:
        stop_process(gateway)


def keyed_env(svc: Service) -> dict[str, str]:
    """The client's environment: server and key from LDM_URL / LDM_API_KEY."""
    return {**os.environ, "LDM_URL": svc.url, "LDM_API_KEY": KEY}


def native(svc: Service) -> httpx.Client:
    return httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def test_txt2img_writes_seeded_files_and_shows_step_progress(service: Service, tmp_path: Path) -> None:
    proc = run_client(["txt2img", "--url", service.url, "--prompt", "cli progress", "--n", "2", "--seed", "5",
                       *FAST, "--out-dir", str(tmp_path), "--json", "--progress", "always"])
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert proc.stdout.startswith(f"job {job['id']}\n")
    assert job["status"] == "succeeded" and job["seeds"] == [5, 6]
    names = sorted(Path(f["path"]).name for f in job["files"])
    assert names == [f"{job['id']}-0-seed5.png", f"{job['id']}-1-seed6.png"]
    for f in job["files"]:
        assert Image.open(f["path"]).size == (64, 64)
    total = job["progress"]["total"]
    assert "image 0 (seed 5)" in proc.stderr and "image 1 (seed 6)" in proc.stderr
    assert f"{total}/{total}" in proc.stderr and f"1/{total}" in proc.stderr  # bars counted the steps


def test_inpaint_is_quiet_off_a_terminal_and_keeps_unmasked_pixels(service: Service, tmp_path: Path) -> None:
    source = Image.fromarray(np.full((64, 64, 3), (30, 160, 90), np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 8:40] = 255
    source.save(tmp_path / "in.png")
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    proc = run_client(["inpaint", "--url", service.url, "--prompt", "cli inpaint", "--seed", "9", *FAST[:4],
                       "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                       "--out-dir", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # not a terminal: no bars
    job_line, file_line = proc.stdout.splitlines()
    path = Path(file_line.split()[0])
    assert path.name == f"{job_line.split()[1]}-0-seed9.png" and file_line.endswith("seed=9")
    out = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(out[mask == 0], np.asarray(source)[mask == 0])


def test_img2img_uploads_the_init_image_and_sends_strength(service: Service, tmp_path: Path) -> None:
    grad = np.zeros((64, 64, 3), np.uint8)
    grad[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]
    Image.fromarray(grad).save(tmp_path / "init.png")
    proc = run_client(["img2img", "--url", service.url, "--prompt", "cli img2img", "--seed", "4", "--steps", "8",
                       "--strength", "0.5", "--image", str(tmp_path / "init.png"), "--out-dir", str(tmp_path),
                       "--json", "--progress", "always"])
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert job["kind"] == "img2img" and job["parameters"]["strength"] == 0.5
    assert job["progress"]["total"] == 4 and "step 4/4" in proc.stderr  # int(8 * 0.5) steps ran
    assert Path(job["files"][0]["path"]).name == f"{job['id']}-0-seed4.png"
    assert Image.open(job["files"][0]["path"]).size == (64, 64)  # the init image's size
    refused = run_client(["img2img", "--url", service.url, "--prompt", "x", "--strength", "1.5",
                          "--image", str(tmp_path / "init.png")])
    assert refused.returncode == 2 and "strength" in refused.stderr and "HTTP 422" in refused.stderr


def test_a_refused_request_prints_the_servers_message_and_exits_2(service: Service, tmp_path: Path) -> None:
    proc = run_client(["txt2img", "--url", service.url, "--prompt", "too wide", "--width", "1000",
                       "--out-dir", str(tmp_path)])
    assert proc.returncode == 2
    assert "width" in proc.stderr and "256" in proc.stderr and "HTTP 422" in proc.stderr
    assert proc.stdout == "" and not list(tmp_path.iterdir())


def test_no_wait_then_watch_jobs_models_and_cancel(service: Service, tmp_path: Path) -> None:
    env = {**os.environ, "LDM_URL": service.url}
    submitted = run_client(["txt2img", "--prompt", "cli no wait", "--seed", "1", *FAST, "--no-wait", "--json"], env)
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["status"] in {"queued", "running"} and not list(tmp_path.iterdir())
    watched = run_client(["watch", job["id"], "--out-dir", str(tmp_path), "--quiet"], env)
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.splitlines()[-1] == f"{tmp_path / (job['id'] + '-0-seed1.png')}  seed=1"
    listed = run_client(["jobs", "--json", "--status", "succeeded", "--limit", "100"], env)
    assert job["id"] in [j["id"] for j in json.loads(listed.stdout)["data"]]
    models = run_client(["models"], env)
    assert models.returncode == 0 and re.match(r"random-untrained  workers=[1-9]", models.stdout)
    done = run_client(["cancel", job["id"]], env)  # a finished job stays finished
    assert done.returncode == 0 and done.stdout.split() == [job["id"], "succeeded"]
    missing = run_client(["watch", "0" * 26], env)
    assert missing.returncode == 2 and "HTTP 404" in missing.stderr


def _interrupt_while_queued(svc: Service, extra: list[str], answer: str) -> tuple[LiveClient, str, int]:
    client = LiveClient(["txt2img", "--prompt", "cli interrupt", *FAST, "--progress", "always", *extra],
                        keyed_env(svc))
    if answer:
        client.proc.stdin.write(answer)  # read only after the interrupt, at the prompt
        client.proc.stdin.flush()
    wait_until(lambda: "queue position 0" in client.stderr(), 60, "the client to show the queue position")
    job_id = client.stdout().split()[1]
    client.proc.send_signal(signal.SIGINT)
    return client, job_id, client.finish()


@pytest.mark.parametrize(("answer", "status"), [("y\n", "canceled"), ("n\n", "queued")])
def test_ctrl_c_asks_whether_to_cancel(queued_only: Service, answer: str, status: str) -> None:
    client, job_id, code = _interrupt_while_queued(queued_only, [], answer)
    assert code == 130, client.stderr()
    assert f"cancel job {job_id} on the server? [y/N]" in client.stderr()
    with native(queued_only) as c:
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == status
        if status == "queued":
            assert f"ldm-serve client watch {job_id}" in client.stderr()
            assert c.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"


def test_ctrl_c_cancels_without_asking_when_told(queued_only: Service) -> None:
    client, job_id, code = _interrupt_while_queued(queued_only, ["--cancel-on-interrupt"], "")
    assert code == 130 and "[y/N]" not in client.stderr()
    assert f"job {job_id}: canceled" in client.stderr()
    with native(queued_only) as c:
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "canceled"


def test_the_key_comes_from_api_key_or_the_environment_else_401(queued_only: Service) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LDM_API_KEY"}
    proc = run_client(["jobs", "--url", queued_only.url], env)
    assert proc.returncode == 2 and "HTTP 401" in proc.stderr and "Bearer" in proc.stderr
    given = run_client(["jobs", "--url", queued_only.url, "--api-key", KEY, "--json"], env)
    assert given.returncode == 0 and json.loads(given.stdout)["object"] == "list"
    wrong = run_client(["jobs", "--api-key", "not-the-key"], keyed_env(queued_only))  # the option wins
    assert wrong.returncode == 2 and "not valid" in wrong.stderr


def test_ctrl_c_on_a_running_job_cancels_it_on_the_server(service: Service, tmp_path: Path) -> None:
    # Four 128 px images (the tiny model's largest) at the test server's 60-step limit: seconds of work, so
    # the SIGINT that follows the first drawn step lands while the job runs. A job can still outrun its
    # cancel on a fast machine, hence a few attempts; each one must exit 130 and end the job.
    env = {**os.environ, "LDM_URL": service.url}
    args = ["txt2img", "--prompt", "cli interrupt running", "--n", "4", "--steps", "60", "--guidance-scale", "3",
            "--width", "128", "--height", "128", "--progress", "always", "--cancel-on-interrupt",
            "--out-dir", str(tmp_path)]  # a job that outruns its cancel writes its images there
    with httpx.Client(base_url=service.url, timeout=30) as c:
        for _attempt in range(3):
            client = LiveClient(args, env)
            wait_until(lambda cl=client: re.search(r"step [1-9][0-9]*/", cl.stderr()) or cl.proc.poll() is not None,
                       120, "the client to draw a step of the running job")
            assert client.proc.poll() is None, client.stderr()
            job_id = client.stdout().split()[1]
            client.proc.send_signal(signal.SIGINT)
            assert client.finish() == 130, client.stderr()
            status = wait_until(lambda j=job_id: (s := c.get(f"/v1/jobs/{j}").json()["status"]) in (
                "canceled", "succeeded") and s, 60, f"job {job_id} to end")
            if status == "canceled":
                # the client asked while the job ran (the worker drops it at its next step)
                assert f"job {job_id}: cancel requested (status running)" in client.stderr()
                break
        else:
            pytest.fail("three running jobs all finished before the client's cancel arrived")
