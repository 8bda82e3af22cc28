"""MNIST test digits redrawn as the everyday images people feed a digit classifier.

Each style takes a 28x28 uint8 MNIST digit (white ink on black) and a random generator, and
returns (PIL image, file suffix). The pictures differ from MNIST in every way preprocessing has
to undo: size, polarity, page colour, position, margins, colour, transparency, compression.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _ink(digit: np.ndarray, size: int) -> np.ndarray:
    """The digit's ink in [0, 1], scaled to size x size with smooth (bicubic) edges."""
    image = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image, dtype=np.float64) / 255.0, 0.0, 1.0)


def large_black_on_white_rgb(digit: np.ndarray, rng: np.random.Generator):
    """A big drawing: black ink on a white page, RGB, 280-420 px, saved as PNG."""
    ink = _ink(digit, int(rng.integers(280, 421)))
    page = np.round(255 * (1.0 - ink)).astype(np.uint8)
    return Image.fromarray(np.stack([page] * 3, axis=-1), "RGB"), ".png"


def off_centre_jpeg_on_grey(digit: np.ndarray, rng: np.random.Generator):
    """A photo of a page: dark ink on a mid-grey sheet, the digit well off centre, JPEG."""
    size = int(rng.integers(90, 160))
    ink = _ink(digit, size)
    height, width = int(rng.integers(300, 400)), int(rng.integers(400, 520))
    paper = rng.uniform(150, 200)
    canvas = np.full((height, width), paper)
    top = int(rng.integers(10, height - size - 10))
    left = int(rng.choice([rng.integers(10, width // 4),
                           rng.integers(width // 2, width - size - 10)]))
    dark = rng.uniform(10, 50)
    region = canvas[top:top + size, left:left + size]
    canvas[top:top + size, left:left + size] = region * (1 - ink) + dark * ink
    canvas += rng.normal(0, 3, canvas.shape)  # sensor noise
    rgb = np.clip(np.stack([canvas * 1.02, canvas, canvas * 0.95], axis=-1), 0, 255)
    return Image.fromarray(rgb.astype(np.uint8), "RGB"), ".jpg"


def small_white_on_black_uneven_margins(digit: np.ndarray, rng: np.random.Generator):
    """A small crop: white ink on black, barely bigger than the digit, uneven margins, BMP."""
    rows, cols = np.nonzero(digit > 30)
    tight = digit[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = rng.uniform(0.7, 1.3)
    h, w = max(4, round(tight.shape[0] * scale)), max(2, round(tight.shape[1] * scale))
    ink = np.asarray(Image.fromarray(tight).resize((w, h), Image.Resampling.BILINEAR))
    top, bottom, left, right = (int(m) for m in rng.integers(1, 9, size=4))
    canvas = np.zeros((h + top + bottom, w + left + right), dtype=np.uint8)
    canvas[top:top + h, left:left + w] = ink
    return Image.fromarray(canvas, "L"), ".bmp"


def rgba_transparent_coloured_ink(digit: np.ndarray, rng: np.random.Generator):
    """A sticker: coloured ink whose opacity is the stroke, on a transparent background."""
    ink = _ink(digit, int(rng.integers(100, 240)))
    colours = [(200, 30, 30), (30, 60, 200), (20, 120, 40), (120, 30, 150)]
    colour = colours[int(rng.integers(len(colours)))]
    rgba = np.zeros(ink.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = colour  # the colour is everywhere; only the alpha draws the digit
    rgba[..., 3] = np.round(255 * ink).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA"), ".png"


STYLES = {
    "large-black-on-white-rgb": large_black_on_white_rgb,
    "off-centre-jpeg-on-grey": off_centre_jpeg_on_grey,
    "small-white-on-black": small_white_on_black_uneven_margins,
    "rgba-transparent-coloured": rgba_transparent_coloured_ink,
}


def write(style: str, digit: np.ndarray, path_stem, rng: np.random.Generator):
    """Draw `digit` in `style` and save it; return the file's path."""
    image, suffix = STYLES[style](digit, rng)
    path = path_stem.with_suffix(suffix)
    image.save(path, quality=85) if suffix == ".jpg" else image.save(path)
    return path


# The transposition that turns an upright picture into the pixels a camera stores with each EXIF
# Orientation (the inverse of the one a viewer applies to show it upright).
_STORED_AS = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_270}


def phone_photo(upright: Image.Image, orientation: int, format: str = "JPEG") -> bytes:
    """`upright` saved as a phone saves a photo: the pixels as the sensor saw them, and an EXIF
    Orientation tag saying how a viewer turns them upright."""
    import io

    from PIL import ImageOps

    how = _STORED_AS[orientation]
    stored = upright if how is None else upright.transpose(how)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, format=format, exif=exif.tobytes(), **(
        {"quality": 90} if format == "JPEG" else {}))
    # Checked against Pillow's own reading of the tag, so the files are what a phone writes.
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue())))
    assert shown.size == upright.size
    return buffer.getvalue()
