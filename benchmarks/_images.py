"""Generated JPEG images and the decode transform the image benchmarks share."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def make_jpegs(n: int, size: int = 160, seed: int = 0) -> list[bytes]:
    """Smooth random colour images (photo-like JPEG sizes), encoded at quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def decode(jpeg: bytes, out: int = 128) -> np.ndarray:
    """JPEG bytes → resized, normalised CHW float32 (PIL and numpy release the GIL)."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((out, out), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32)
    x *= 1 / 255
    x -= MEAN
    x /= STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))
