"""Gateway input checks that need no Redis: uploads, Prefer header, request schemas."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from pydantic import ValidationError

from ldm_serve.errors import InvalidInput
from ldm_serve.settings import Settings
from service.images import decode_base64_field, load_image, prepare_inpaint_inputs
from service.routes.generate import parse_prefer_wait
from service.schemas import build_schemas


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_base64_and_data_urls() -> None:
    raw = png((8, 8))
    text = base64.b64encode(raw).decode()
    assert decode_base64_field("image", text, 10_000) == raw
    assert decode_base64_field("image", f"data:image/png;base64,{text}", 10_000) == raw
    with pytest.raises(InvalidInput, match="image: malformed base64"):
        decode_base64_field("image", "@@@", 10_000)
    with pytest.raises(InvalidInput, match="max_upload_bytes=10"):
        decode_base64_field("image", text, 10)


def test_images_within_limits_only() -> None:
    assert load_image("image", png((16, 16)), max_bytes=10_000, max_pixels=256).size == (16, 16)
    with pytest.raises(InvalidInput, match="max_upload_pixels=255"):
        load_image("image", png((16, 16)), max_bytes=10_000, max_pixels=255)
    with pytest.raises(InvalidInput, match="max_upload_bytes"):
        load_image("mask", png((16, 16)), max_bytes=10, max_pixels=256)
    with pytest.raises(InvalidInput, match="mask: is not a decodable image"):
        load_image("mask", b"GIF89a nonsense", max_bytes=10_000, max_pixels=256)
    bomb = png((6000, 6000), "1")  # a few kB that decode to 36 M pixels
    assert len(bomb) < 10_000
    with pytest.raises(InvalidInput, match="6000x6000"):
        load_image("image", bomb, max_bytes=100_000, max_pixels=4096 * 4096)


def test_mask_must_match_unless_resized() -> None:
    image, mask = Image.new("RGB", (64, 32)), Image.new("L", (32, 16), 255)
    with pytest.raises(InvalidInput, match="mask: size 32x16 differs from image size 64x32"):
        prepare_inpaint_inputs(image, mask, width=None, height=None, resize_mask=False, max_width=512, max_height=512)
    _, mask_png, w, h = prepare_inpaint_inputs(
        image, mask, width=None, height=None, resize_mask=True, max_width=512, max_height=512
    )
    assert (w, h) == (64, 32) and Image.open(io.BytesIO(mask_png)).size == (64, 32)


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("respond-async", None), ("wait=5", 5), ("wait", 60), ("wait=600", 60), ("x, wait=3", 3)],
)
def test_prefer_wait(header: str | None, expected: int | None) -> None:
    assert parse_prefer_wait(header, 60) == expected


def test_schema_bounds_come_from_settings() -> None:
    req = build_schemas(Settings(max_steps=10, max_width=256)).Txt2ImgRequest
    assert req.model_validate({"prompt": "p", "steps": 10, "width": 256}).steps == 10
    for bad in ({"steps": 11}, {"width": 264}, {"width": 100}, {"n": 0}, {"eta": 2}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            req.model_validate({"prompt": "p", **bad})
