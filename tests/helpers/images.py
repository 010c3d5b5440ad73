"""Images as the client sends them: encoded bytes, and multipart fields of them."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(array: np.ndarray | Image.Image, fmt: str = "PNG", **options) -> bytes:
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def upload(*images: bytes, content_type: str = "image/png") -> list[tuple[str, tuple]]:
    """Multipart `file` fields, one per image, in order."""
    return [("file", (f"image{i}.png", data, content_type)) for i, data in enumerate(images)]
