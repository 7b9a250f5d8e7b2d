"""Decoding and checking uploaded images (inpainting and img2img inputs) before they reach the queue.

Every failure is an ``InvalidInput`` naming the field and the limit. Sizes are
checked from the image header *before* pixels are decoded, so a decompression
bomb is refused without allocating it.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from ldm_serve.errors import InvalidInput

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(;[\w-]+=[\w.-]+)*;base64,", re.IGNORECASE)
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})


def decode_base64_field(field: str, value: str, max_bytes: int) -> bytes:
    """Bytes of a base64 string or ``data:`` URL; refuses malformed input and oversize payloads."""
    text = value.strip()
    m = _DATA_URL.match(text)
    if m:
        text = text[m.end():]
    elif text.startswith("data:"):
        raise InvalidInput(field, "data URLs must be base64-encoded (data:image/png;base64,...)")
    text = re.sub(r"\s+", "", text)
    if len(text) * 3 // 4 > max_bytes + 3:
        raise InvalidInput(field, f"decoded size exceeds max_upload_bytes={max_bytes}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(field, f"malformed base64 ({exc})") from None
    if not data:
        raise InvalidInput(field, "is empty")
    return data


def load_image(field: str, data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open and fully decode an uploaded PNG / JPEG / WebP within the byte and pixel limits."""
    if len(data) > max_bytes:
        raise InvalidInput(field, f"{len(data)} bytes exceeds max_upload_bytes={max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ALLOWED_FORMATS:
                raise InvalidInput(field, f"format {img.format} is not accepted (PNG, JPEG or WebP)")
            w, h = img.size
            if w * h > max_pixels:
                raise InvalidInput(field, f"{w}x{h} = {w * h} pixels exceeds max_upload_pixels={max_pixels}")
            img.load()
    except InvalidInput:
        raise
    except UnidentifiedImageError:
        raise InvalidInput(field, "is not a decodable image (not PNG, JPEG or WebP data)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(field, f"is not a decodable image within the limits ({clean_error(exc)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(field, f"is not a decodable image ({clean_error(exc)})") from None
    return img


_OBJECT_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")


def clean_error(exc: BaseException) -> str:
    """An exception's text fit for a client: object reprs (``<_io.BytesIO object at 0x..>``) removed."""
    text = _OBJECT_REPR.sub("", str(exc))
    return re.sub(r"\s{2,}", " ", text).strip(" :") or type(exc).__name__


def to_png(img: Image.Image, mode: str) -> bytes:
    """Re-encode as PNG in ``mode`` (``RGB`` for images, ``L`` for masks) for the worker."""
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def prepare_inpaint_inputs(
    image: Image.Image,
    mask: Image.Image,
    *,
    width: int | None,
    height: int | None,
    resize_mask: bool,
    max_width: int,
    max_height: int,
) -> tuple[bytes, bytes, int, int]:
    """Check the image/mask pair and return ``(image_png, mask_png, width, height)``.

    The output size is the image's size, which must be a multiple of 8 and within
    the limits. The mask must have the same size unless ``resize_mask`` is set, in
    which case it is resized (nearest neighbour, so it stays binary).
    """
    w, h = image.size
    for name, value, limit in (("image.width", w, max_width), ("image.height", h, max_height)):
        if value % 8:
            raise InvalidInput(name, f"must be a multiple of 8, got {value}")
        if value > limit:
            raise InvalidInput(name, f"must be <= {limit}, got {value}")
    if width is not None and width != w:
        raise InvalidInput("width", f"must equal the image width {w} (or be omitted)")
    if height is not None and height != h:
        raise InvalidInput("height", f"must equal the image height {h} (or be omitted)")
    if mask.size != image.size:
        if not resize_mask:
            raise InvalidInput(
                "mask",
                f"size {mask.size[0]}x{mask.size[1]} differs from image size {w}x{h} (set mask_resize=true to resize)",
            )
        mask = mask.convert("L").resize((w, h), Image.Resampling.NEAREST)
    return to_png(image, "RGB"), to_png(mask, "L"), w, h


def prepare_img2img_input(
    image: Image.Image, *, width: int | None, height: int | None, max_width: int, max_height: int
) -> tuple[bytes, int, int]:
    """Check an img2img init image and return ``(image_png, width, height)``.

    The output size is ``width`` x ``height``, each defaulting to the image's side (which
    must then be a multiple of 8 and within the limits). An image of another size is
    scaled (Lanczos) to cover the output size and centre-cropped to it, so its aspect
    ratio is kept.
    """
    w, h = image.size
    for name, given, side, limit in (("width", width, w, max_width), ("height", height, h, max_height)):
        if given is not None:
            continue  # the schema bounded it; the image is resized to it
        if side % 8:
            raise InvalidInput(f"image.{name}", f"must be a multiple of 8, got {side} (or give {name} to resize to)")
        if side > limit:
            raise InvalidInput(f"image.{name}", f"must be <= {limit}, got {side} (or give {name} to resize to)")
    out_w, out_h = width or w, height or h
    return to_png(fit_image(image, out_w, out_h), "RGB"), out_w, out_h


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` as RGB of exactly ``width`` x ``height``: unchanged when it has that size, else
    scaled (Lanczos) to cover it and centre-cropped (the aspect ratio is kept)."""
    rgb = image.convert("RGB")
    if rgb.size == (width, height):
        return rgb
    return ImageOps.fit(rgb, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
