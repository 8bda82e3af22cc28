"""Turn an everyday image (a photo, a scan, a drawing) into a 28x28 image the way MNIST was made.

MNIST's digits were white ink on black, cropped to the ink, scaled so the longer side is 20
pixels (keeping the aspect ratio, with anti-aliasing), and pasted into 28x28 so that the centre
of mass of the ink sits at the centre. Fashion-MNIST's clothes were scaled so the longer side is
28 pixels and centred by their bounding box. A model only works on images that look like that.

This module needs only NumPy and Pillow, not torch, so a program that runs an exported ONNX
model with onnxruntime can prepare its inputs exactly as `torchmnist predict` does.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np

INK_FLOOR = 0.1  # after stretching ink to [0, 1]: weaker values are paper texture or noise
MIN_CONTRAST = 0.08  # ink must differ from the page by this much (of the full range) to count
DENOISE_FROM = 100  # pixels: pictures at least this big are median-filtered before cropping
MAX_PIXELS = 120_000_000  # larger images are refused (a 108-megapixel photo is read)
MAX_SIDE = 2048  # larger images are shrunk to this while they are read
# The brands of an ISO base media file (its "ftyp" box) that hold HEIF images: the iPhone's
# photos (HEIC) and their kin, which Pillow opens only with the pillow-heif plugin.
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1",
               b"msf1"}


@dataclass(frozen=True)
class Style:
    """How a dataset's 28x28 images were made from their originals."""

    box: int  # the longer side of the object, in pixels
    centre: str  # "mass": centre of mass at the centre; "box": bounding box centred


STYLES = {"mnist": Style(20, "mass"), "kmnist": Style(28, "box"),
          "fashion-mnist": Style(28, "box")}


class ImageError(ValueError):
    """A file that cannot be turned into a model input; the message is one sentence."""


def read_grey(path: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Any image file Pillow reads, or its bytes, as float grey in [0, 1]: transparent pixels on
    white, as a viewer shows them, the first frame of an animation; more than `max_pixels` is
    refused before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(path, bytes | bytearray):
            if not path:
                raise ImageError("the file is empty")
            path = io.BytesIO(path)
        else:
            found = os.stat(path)
            if not stat.S_ISREG(found.st_mode):  # a pipe or a device would be read forever
                raise ImageError("it is not a regular file")
            if found.st_size == 0:
                raise ImageError("the file is empty")
        with warnings.catch_warnings():
            # Pillow warns from 89 million pixels on; max_pixels is the limit here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", "Corrupt EXIF data")  # the pixels still read
            try:
                image = Image.open(path)  # Pillow's own file, closed with the image
            except UnidentifiedImageError:
                if not (_is_heif(path) and _heif_opener()):
                    raise
                image = Image.open(path)
        with image:
            image.seek(0)
            width, height = image.size  # read from the header: nothing is decoded yet
            if width * height > max_pixels:
                raise ImageError(f"the image is {width}x{height} pixels, more than the "
                                 f"{max_pixels / 10**6:g} million torchmnist reads; scale it "
                                 "down first")
            turn = _orientation(image)
            return _to_grey(_upright(_reduced(image), turn))
    except ImageError:
        raise
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise ImageError(f"cannot read it: {error.strerror}") from None
    except UnidentifiedImageError:
        if not _is_heif(path):
            raise ImageError("not an image file Pillow can read") from None
        if _heif_opener():  # the plugin is there: the file itself is at fault
            raise ImageError("damaged image data (a HEIC/HEIF file that pillow-heif cannot "
                             "read)") from None
        raise ImageError("a HEIC/HEIF photo (the iPhone's format), which Pillow reads only "
                         "with its plugin: pip install 'torchmnist[heic]' (pillow-heif), or "
                         "save it as JPEG") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or damaged data
        raise ImageError(f"damaged image data ({str(error).strip() or type(error).__name__})"
                         ) from None
    except Image.DecompressionBombError as error:
        raise ImageError(str(error)) from None


def _is_heif(source) -> bool:
    """Whether a file (a path or a buffer) starts as a HEIF image does: an "ftyp" box of a
    HEIF brand."""
    try:
        if isinstance(source, io.BytesIO):
            head = source.getvalue()[:12]
        else:
            with open(source, "rb") as f:
                head = f.read(12)
    except OSError:
        return False
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def _heif_opener() -> bool:
    """Teach Pillow to open HEIF files, if pillow-heif is installed (once is enough)."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _orientation(image) -> int:
    """The EXIF Orientation tag (1-8; 1: upright), read before anything is decoded. Phones store
    the sensor's pixels as they came and this tag to say how a viewer turns them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data", as in read_grey
            turn = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - damaged EXIF fails in many ways
        return 1
    return turn if isinstance(turn, int) else 1


def _upright(image, turn: int):
    """The picture as a viewer shows it: turned and mirrored as its EXIF Orientation says (the
    transpositions of Pillow's ImageOps.exif_transpose)."""
    from PIL.Image import Transpose

    how = {2: Transpose.FLIP_LEFT_RIGHT, 3: Transpose.ROTATE_180, 4: Transpose.FLIP_TOP_BOTTOM,
           5: Transpose.TRANSPOSE, 6: Transpose.ROTATE_270, 7: Transpose.TRANSVERSE,
           8: Transpose.ROTATE_90}.get(turn)
    return image if how is None else image.transpose(how)


def _reduced(image):
    """The decoded image, its longer side at most MAX_SIDE pixels (a JPEG decoded at a fraction
    of its size), so a big photo never becomes big arrays of floats."""
    width, height = image.size
    if max(width, height) > MAX_SIDE:
        scale = MAX_SIDE / max(width, height)
        image.draft(None, (max(1, round(width * scale)), max(1, round(height * scale))))
    image.load()
    if max(image.size) > MAX_SIDE:
        if image.mode.startswith("I;16"):  # 16-bit scans: 32-bit integers resize
            image = image.convert("I")
        elif image.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):
            image = image.convert("RGBA")
        image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image


def _to_grey(image) -> np.ndarray:
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float scans
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        return np.clip(values / top, 0.0, 1.0)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if image.mode == "L" and not has_alpha:  # already 8-bit grey (MNIST-like files): as is
        return np.asarray(image, dtype=np.float64) / 255.0
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    grey = image.convert("RGB").convert("L")  # ITU-R 601 luma, whatever the colour model
    return np.asarray(grey, dtype=np.float64) / 255.0


def ink_map(grey: np.ndarray) -> np.ndarray:
    """Ink as 1 and page as 0, whichever way round: the page covers the border (lighter than
    mid-grey: dark ink, so inverted); its level is subtracted and the ink stretched to 1."""
    if grey.ndim != 2 or grey.size == 0:
        raise ImageError("the image has no pixels")
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    page = float(np.median(border))
    ink = 1.0 - grey if page > 0.5 else grey
    page = 1.0 - page if page > 0.5 else page
    strongest = float(np.percentile(ink, 99.9))
    if strongest - page < MIN_CONTRAST:
        raise ImageError("no ink found: the image is blank or has almost no contrast")
    ink = np.clip((ink - page) / (strongest - page), 0.0, 1.0)
    if min(ink.shape) >= DENOISE_FROM:
        # In a photo or scan a stroke is many pixels wide, so what a 3x3 median removes is
        # sensor noise or dust, which would otherwise stretch the ink's bounding box.
        from PIL import Image, ImageFilter

        smooth = Image.fromarray(np.round(ink * 255).astype(np.uint8))
        ink = np.asarray(smooth.filter(ImageFilter.MedianFilter(3)), dtype=np.float64) / 255.0
    ink[ink < INK_FLOOR] = 0.0
    return ink


def to_28x28(ink: np.ndarray, style: Style = STYLES["mnist"]) -> np.ndarray:
    """Crop to the ink, scale its longer side to `style.box` pixels, centre in 28x28: float32
    (28, 28) in [0, 1], white ink on black, as MNIST stores it (divided by 255)."""
    from PIL import Image

    rows, cols = np.nonzero(ink)
    if rows.size == 0:
        raise ImageError("no ink found: the image is blank")
    crop = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = crop.shape
    scale = style.box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # Lanczos on the 8-bit image anti-aliases when shrinking, as MNIST's resampling did.
    crop8 = Image.fromarray(np.round(crop * 255).astype(np.uint8))
    small = np.asarray(crop8.resize(size, Image.Resampling.LANCZOS), dtype=np.float64) / 255.0
    canvas = np.zeros((28, 28), dtype=np.float64)
    sh, sw = small.shape
    if style.centre == "mass" and small.sum() > 0:
        ys, xs = np.indices(small.shape)
        cy, cx = (ys * small).sum() / small.sum(), (xs * small).sum() / small.sum()
        # MNIST's centres of mass sit at (14.0, 14.0) (measured: 13.99 and 14.00 on average
        # over the test set), not at the geometric centre 13.5.
        top, left = round(14 - cy), round(14 - cx)
    else:
        top, left = (28 - sh) // 2, (28 - sw) // 2
    # Paste, clipping whatever a lopsided centre of mass pushes past the edge.
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + sh, 28), min(left + sw, 28)
    canvas[y0:y1, x0:x1] = small[y0 - top:y1 - top, x0 - left:x1 - left]
    return canvas.astype(np.float32)


def as_stored(grey: np.ndarray) -> np.ndarray:
    """An image folder's way: the picture as it is, grey, resized to 28x28 (Lanczos on 8 bits),
    nothing inverted, cropped or centred; float32 in [0, 1], in steps of 1/255."""
    from PIL import Image

    if grey.ndim != 2 or grey.size == 0:
        raise ImageError("the image has no pixels")
    pixels = np.round(grey * 255).astype(np.uint8)
    if pixels.shape != (28, 28):
        image8 = Image.fromarray(pixels).resize((28, 28), Image.Resampling.LANCZOS)
        pixels = np.asarray(image8)
    return pixels.astype(np.float32) / 255.0


def _as_input(grey: np.ndarray, dataset: str) -> np.ndarray:
    """A grey picture as the dataset's images were made: MNIST's way and its kin's, or, for
    your own data, as it is (`as_stored`)."""
    if dataset in STYLES:
        return to_28x28(ink_map(grey), STYLES[dataset])
    return as_stored(grey)


def prepare(path: str | os.PathLike, dataset: str = "mnist") -> np.ndarray:
    """An image file as the dataset's kind of 28x28 image, float32 in [0, 1] (not normalised)."""
    return _as_input(read_grey(path), dataset)


def prepare_bytes(data: bytes, dataset: str = "mnist", max_pixels: int = MAX_PIXELS,
                  ) -> np.ndarray:
    """`prepare` for an image file's bytes (an upload)."""
    return _as_input(read_grey(data, max_pixels), dataset)


def prepare_picture(picture, dataset: str = "mnist") -> np.ndarray:
    """`prepare` for a picture in memory: a PIL image, or a NumPy array, grey (H, W) or
    (1, H, W), or colour (H, W, 3 or 4), of uint8 0-255 or floats in [0, 1]."""
    from PIL import Image

    if not isinstance(picture, Image.Image):
        try:
            array = np.asarray(picture)
        except ValueError:  # nested lists of uneven lengths
            raise ImageError("a list whose rows differ in length is not a picture: give (H, W), "
                             "(1, H, W) or (H, W, 3|4)") from None
        if array.ndim == 3 and array.shape[0] == 1:
            array = array[0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            raise ImageError(f"an array of shape {tuple(array.shape)} is not a picture: give "
                             "(H, W), (1, H, W) or (H, W, 3|4)")
        array = _as_uint8(array)
        picture = Image.fromarray(array)
    else:
        picture = picture.copy()  # reduced in place below; the caller's image stays as it was
    width, height = picture.size
    if width * height > MAX_PIXELS:
        raise ImageError(f"the image is {width}x{height} pixels, more than the "
                         f"{MAX_PIXELS // 10**6} million torchmnist reads; scale it down first")
    turn = _orientation(picture)  # a PIL image opened from a phone's photo still has its tag
    return _as_input(_to_grey(_upright(_reduced(picture), turn)), dataset)


def _as_uint8(array: np.ndarray) -> np.ndarray:
    """Pixels as 0-255: whole numbers as they are, fractions from [0, 1]; any other range (floats
    of 0-255, normalised images) is refused rather than clipped to a white picture."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ImageError(f"whole-number pixels must be 0-255, not {array.min()} to "
                             f"{array.max()}")
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.floating):
        raise ImageError(f"an array of {array.dtype} is not a picture: give uint8 0-255 or "
                         "floats in [0, 1]")
    if not np.isfinite(array).all():
        raise ImageError("the picture holds NaN or infinite values")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if low < -1e-6 or high > 1 + 1e-6:
        hint = " (divide by 255)" if high > 1 and low >= 0 else " (not normalised ones)"
        raise ImageError(f"fractional pixels must be in [0, 1], not {low:g} to {high:g}{hint}")
    return np.round(np.clip(array.astype(np.float64), 0.0, 1.0) * 255).astype(np.uint8)


def normalise(image: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(28, 28) in [0, 1] -> (1, 28, 28) float32 with the training set's mean and std, the
    input every torchmnist model (and its ONNX or TorchScript export) takes."""
    return ((image - mean) / std).astype(np.float32)[None]
