"""Encoding generated images in the requested output format."""

from __future__ import annotations

import io

from PIL import Image

from ldm_serve.contract import OutputFormat

_PIL_FORMAT = {OutputFormat.PNG: "PNG", OutputFormat.JPEG: "JPEG", OutputFormat.WEBP: "WEBP"}


def encode_image(image: Image.Image, fmt: OutputFormat, quality: int) -> bytes:
    """Encode ``image`` as PNG (lossless, quality ignored), JPEG or WebP at ``quality`` (1-100)."""
    buf = io.BytesIO()
    rgb = image.convert("RGB")
    if fmt is OutputFormat.PNG:
        rgb.save(buf, format="PNG")
    else:
        rgb.save(buf, format=_PIL_FORMAT[fmt], quality=quality)
    return buf.getvalue()


def decode_input(data: bytes) -> Image.Image:
    """Open stored input bytes (already validated by the gateway)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
