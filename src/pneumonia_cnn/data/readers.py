"""Turn one file (JPEG, PNG, BMP, TIFF, DICOM) into a grayscale uint8 array of a fixed size.

Every reader failure becomes an ``ImageReadError`` with a one-line reason, so callers can skip the file
and go on. Decoding is the only place that touches file bytes; everything above works on arrays.
"""
from __future__ import annotations

import io
import os
import re
import sys
import threading
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from ..errors import ImageReadError
from .dicom import NOT_DICOM, read_dicom
from .dicom_guard import looks_like_dicom as starts_like_dicom
from .image import MAX_PIXELS, MIN_SIDE, ImageMeta, scale_to_uint8

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES
# Pillow opens some forty formats; only these are read. Others reach code no X-ray needs (EPS runs Ghostscript on
# a temporary file of the upload) and are refused by content, whatever the file is called.
PIL_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "GIF")
RESAMPLING = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC,
              "area": Image.BOX, "lanczos": Image.LANCZOS}

ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None  # our own check below gives the clearer message


def is_candidate_file(path: Path) -> bool:
    name = path.name
    if name.startswith(".") or name.startswith("._"):
        return False
    return path.suffix.lower() in SUPPORTED_SUFFIXES


def looks_like_dicom(path: Path) -> bool:
    """Whether the file's content is DICOM (the 'DICM' magic, or a data set without the preamble), as the readers
    decide it; its name plays no part."""
    try:
        with open(path, "rb") as handle:
            return starts_like_dicom(handle.read(132))
    except OSError:
        return False


def _pil_to_gray(image: Image.Image, path: Path) -> np.ndarray:
    """Gray uint8, converted a strip of rows at a time where the conversion needs more than a byte per pixel: a
    49-megapixel 16-bit or transparent image converted whole held a gigabyte of full-size copies."""
    mode = image.mode
    if mode in ("I", "F"):
        return scale_to_uint8(_unsigned_if_stored_so(image, np.asarray(image)))
    if mode.startswith("I;16"):
        levels = stored_levels(image)
        return _by_strips(image, lambda strip: _to_8_bits(np.asarray(strip), levels))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Composite transparency onto black, as an X-ray viewer's background would show it.
        return _by_strips(image, _on_black)
    if mode == "CMYK":
        return _by_strips(image, lambda strip: np.asarray(strip.convert("RGB").convert("L")))
    return np.asarray(image.convert("L"), dtype=np.uint8)


def stored_levels(image: Image.Image) -> int:
    """The largest value of the depth a 16-bit image's data has, of those X-rays are stored at: 8 bits when no
    value exceeds 255, 12 when none exceeds 4095, else 16. 12-bit data divided by 257 as if it filled 16 bits had
    decoded to 17 grey levels (0-16) and moved children's probabilities by up to 0.40; a depth read from every
    power of two would have doubled an image's brightness between a peak of 32767 and one of 32768. Pillow has no
    extrema of big-endian 16-bit data (a big-endian 16-bit gray TIFF, as ImageJ writes, was refused "image has wrong
    mode"): its peak is found a strip at a time."""
    if image.mode != "I;16B":
        return levels_of_peak(int(image.getextrema()[1]))
    width, height = image.size
    return levels_of_peak(max(int(np.asarray(image.crop((0, top, width, min(top + STRIP_ROWS, height)))).max())
                              for top in range(0, height, STRIP_ROWS)))


def levels_of_peak(peak: int) -> int:
    return 255 if peak <= 255 else 4095 if peak <= 4095 else 65535


def _to_8_bits(values: np.ndarray, levels: int) -> np.ndarray:
    """x * 255 / levels rounded, in integers (x / 257 for 16 bits: never half-way)."""
    return ((values.astype(np.uint32) * 510 + levels) // (2 * levels)).astype(np.uint8)


def _unsigned_if_stored_so(image: Image.Image, pixels: np.ndarray) -> np.ndarray:
    """An unsigned 32-bit TIFF as unsigned: Pillow reads it into its signed 32-bit mode 'I', so every value from
    2**31 wrapped negative (an X-ray stored at full range scored 0.95 against 0.03 as a JPEG)."""
    tags = getattr(image, "tag_v2", None)
    if image.mode != "I" or tags is None:
        return pixels
    # BitsPerSample and SampleFormat (1: unsigned, the default), one value per channel
    bits, sample_format = (np.ravel(tags.get(tag, 1))[0] for tag in (258, 339))
    return pixels.view(np.uint32) if bits == 32 and sample_format == 1 else pixels


STRIP_ROWS = 256


def _by_strips(image: Image.Image, convert) -> np.ndarray:
    width, height = image.size
    out = np.empty((height, width), dtype=np.uint8)
    for top in range(0, height, STRIP_ROWS):
        bottom = min(top + STRIP_ROWS, height)
        out[top:bottom] = convert(image.crop((0, top, width, bottom)))
    return out


def _on_black(strip: Image.Image) -> np.ndarray:
    rgba = strip.convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("L"))


# Pillow has no 16-bit colour mode: it reads a 16-bit RGB, RGBA or gray+alpha PNG, and a 16-bit RGB or RGBA TIFF,
# keeping each sample's high byte (12-bit data came out as 16 grey levels, probabilities moved by up to 0.20 for PNG,
# 0.11 for TIFF, against the same pixels as 16-bit gray), and a TIFF of separate 16-bit colour planes as bytes taken
# at the wrong places (moved by up to 0.995). The file is decoded a second time, in Pillow's decoders (which undo
# PNG's row filters and TIFF's compression alike), with raw modes that keep the bytes the first decode dropped: the
# low byte of each sample (the unpacker of the other byte order), or for gray+alpha PNG, which Pillow opens as RGBA
# with 4 bytes a pixel (gray high, gray low, alpha high, alpha low), every byte. Kind "rgb": colour alone ("RGBX"'s
# padding, or the premultiplied colour of an associated alpha, which is that colour over black).
PNG16_COLOUR = {"RGB;16B": ("rgb", "RGB;16L"), "RGBA;16B": ("rgba", "RGBA;16L"), "LA;16B": ("la", "RGBA")}
OTHER_BYTE = {"L": "B", "B": "L", "N": "B" if sys.byteorder == "little" else "L"}


def _deep_plan(image: Image.Image, path: Path) -> tuple[str, list, list] | None:
    """(kind, raw modes of the high bytes, of the low bytes: one per tile) of a 16-bit colour or gray+alpha PNG or
    a 16-bit RGB(A) TIFF not loaded yet; None for any other image."""
    modes = [tile[3][0] if isinstance(tile[3], tuple) else tile[3] for tile in image.tile]
    if image.format == "PNG":
        found = PNG16_COLOUR.get(modes[0]) if len(modes) == 1 and isinstance(modes[0], str) else None
        return (found[0], modes, [found[1]]) if found else None
    tags = getattr(image, "tag_v2", {})
    if image.format != "TIFF" or image.mode not in ("RGB", "RGBA") or set(np.ravel(tags.get(258, 8))) != {16}:
        return None
    if image.tile[0][0] == "libtiff" and tags.get(284, 1) == 2:  # Pillow's libtiff planes ignore the raw mode
        raise ImageReadError(path, "16-bit colour TIFF of compressed separate colour planes: only the high byte of "
                                   "each sample can be decoded (save it as 16-bit gray TIFF or PNG)")
    order = "L" if tags.prefix == b"II" else "B"  # a plane's tile holds one band's letter: 16 bits, the file's order
    high = [(f"{mode};16{order}" if len(mode) == 1 else mode).replace("a", "A") for mode in modes]
    if not all(re.fullmatch(r"[RGBAX]+;16[LBN]", mode) for mode in high):
        return None
    kind = "rgba" if image.mode == "RGBA" and 1 not in np.ravel(tags.get(338, ())) else "rgb"
    return kind, high, [mode[:-1] + OTHER_BYTE[mode[-1]] for mode in high]


def _with_rawmodes(tiles: list, modes: list) -> list:
    """The tiles with these raw modes (a TIFF tile's arguments start with it; Pillow's TIFF code reads the tiles'
    fields by name where it has named tiles)."""
    out = []
    for tile, mode in zip(tiles, modes):
        args = (mode, *tile[3][1:]) if isinstance(tile[3], tuple) else mode
        out.append(tile._replace(args=args) if hasattr(tile, "_replace") else (*tile[:3], args))
    return out


def _deep_colour_to_gray(image: Image.Image, plan: tuple, source) -> np.ndarray:
    """Gray uint8 of a 16-bit colour image from all 16 bits, as a 16-bit gray image of the same pixels is read:
    Pillow's RGB-to-L weights (gray stays gray exactly), transparency over black, then the levels of its depth.
    ``image``: loaded with ``plan``'s high bytes; ``source``: its file or bytes, decoded again for the low ones."""
    width, height = image.size
    deep = np.empty((height, width), dtype=np.uint16)
    with Image.open(source, formats=(image.format,)) as again:
        again.tile = _with_rawmodes(again.tile, plan[2])
        again.load()
        for top in range(0, height, STRIP_ROWS):
            box = (0, top, width, min(top + STRIP_ROWS, height))
            deep[top:box[3]] = _deep_gray(np.asarray(image.crop(box)), np.asarray(again.crop(box)), plan[0])
    levels = levels_of_peak(int(deep.max()))
    out = np.empty((height, width), dtype=np.uint8)
    for top in range(0, height, STRIP_ROWS):
        out[top:top + STRIP_ROWS] = _to_8_bits(deep[top:top + STRIP_ROWS], levels)
    return out


def _deep_gray(high: np.ndarray, low: np.ndarray, kind: str) -> np.ndarray:
    """16-bit gray of rows decoded twice (``_deep_plan``), composited over black where there is an alpha."""
    if kind == "la":
        samples = low.astype(np.uint32)
        gray = samples[..., 0] << 8 | samples[..., 1]
        alpha = samples[..., 2] << 8 | samples[..., 3]
    else:
        samples = high.astype(np.uint32) << 8 | low
        # Pillow's convert("L"): (R * 19595 + G * 38470 + B * 7471 + 2**15) >> 16, below 2**32 for 16-bit samples
        gray = (samples[..., 0] * 19595 + samples[..., 1] * 38470 + samples[..., 2] * 7471 + 0x8000) >> 16
        alpha = samples[..., 3] if kind == "rgba" else None
    if alpha is None:
        return gray
    return (gray.astype(np.uint64) * alpha + 32767) // 65535


# EXIF Orientation (0x0112) -> the transpose that shows the image as a viewer does (Pillow's ImageOps.exif_transpose)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag (Pillow also takes XMP's), 1 where there is none or it is unusable."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # damaged EXIF: the pixels are still read, as before
        return 1
    return value if isinstance(value, int) and value in UPRIGHT else 1


def _upright(gray: np.ndarray, orientation: int) -> np.ndarray:
    """``gray`` as a viewer shows a file with this EXIF orientation: a photographed or exported X-ray tagged
    "rotate 90" was scored lying on its side. Done on the decoded 8-bit gray, not on the file's full image."""
    if orientation == 1:
        return gray
    return np.asarray(Image.fromarray(gray).transpose(UPRIGHT[orientation]), dtype=np.uint8)


def _read_pil(path: Path, source=None) -> tuple[np.ndarray, ImageMeta]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source if source is not None else path, formats=PIL_FORMATS) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageReadError(path, f"image is {width}x{height} pixels, above the "
                                               f"{MAX_PIXELS:,}-pixel limit (decompression-bomb guard)")
                if width < MIN_SIDE or height < MIN_SIDE:
                    raise ImageReadError(path, f"image is only {width}x{height} pixels")
                frames = int(getattr(image, "n_frames", 1) or 1)
                if frames > 1:
                    image.seek(0)  # animated GIF/TIFF: the first frame is the image (the warning says so)
                plan = _deep_plan(image, path)  # before loading: the raw modes are the tiles'
                if plan is not None:
                    image.tile = _with_rawmodes(image.tile, plan[1])
                image.load()
                gray = _pil_to_gray(image, path) if plan is None else _deep_colour_to_gray(
                    image, plan, path if source is None else io.BytesIO(source.getvalue()))
                orientation = exif_orientation(image)
                gray = _upright(gray, orientation)
                if orientation in (5, 6, 7, 8):  # turned a quarter: the size as shown
                    width, height = height, width
                saturation = _saturation(image)
                fmt = image.format or path.suffix.lstrip(".").upper()
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, _unreadable_tiff(path, source) or "not a readable image (content is not JPEG, PNG, "
                                                                       "BMP, TIFF, GIF or DICOM)") from None
    except Exception as error:  # untrusted bytes: Pillow's plugins raise many types on corrupt data
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not isinstance(error, (OSError, SyntaxError, ValueError, EOFError)):
            reason = f"corrupt image ({type(error).__name__}: {reason[:160]})"
        if "truncated" in reason.lower() or isinstance(error, EOFError):
            reason = f"truncated or corrupt image data ({reason})"
        raise ImageReadError(path, reason) from None
    return gray, ImageMeta(source_format=fmt, original_size=(height, width), saturation=saturation, frames=frames)


def _unreadable_tiff(path: Path, source) -> str | None:
    """Why a TIFF that Pillow did not open is refused, from its first directory: Pillow decodes some layouts only (a
    16-bit gray+alpha TIFF was said to be no TIFF at all). None for any other content."""
    from PIL import TiffImagePlugin
    try:
        with open(path, "rb") if source is None else nullcontext(source) as stream:
            stream.seek(0)
            head = stream.read(8)
            if head[:4] not in (b"II*\0", b"MM\0*"):
                return None
            directory, size = TiffImagePlugin.ImageFileDirectory_v2(head), stream.seek(0, io.SEEK_END)
            stream.seek(directory.next)
            count = int.from_bytes(stream.read(2), "little" if head[:2] == b"II" else "big")
            if not count or directory.next + 2 + 12 * count > size:  # a damaged directory: Pillow said so
                return None
            stream.seek(directory.next)
            directory.load(stream)
    except Exception:  # too damaged to say more: the general reason
        return None
    if 258 not in directory and 277 not in directory:
        return None
    layout = ", ".join(f"{name} {'/'.join(str(v) for v in np.ravel(directory[tag]))}" for tag, name in
                       ((277, "SamplesPerPixel"), (258, "BitsPerSample"), (262, "PhotometricInterpretation"),
                        (338, "ExtraSamples"), (339, "SampleFormat")) if tag in directory)
    return f"TIFF this reader cannot decode ({layout}); save it as gray PNG or TIFF"


def _saturation(image: Image.Image) -> float:
    if image.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        return 0.0
    # reduced, then converted: a full-size RGB copy of a 49-megapixel image is 147 MB; an RGBA image by nearest
    # neighbour (a smoother filter first makes a full-size premultiplied copy), as a palette image always is
    small = image.resize((64, 64), Image.NEAREST if image.mode == "RGBA" else Image.BICUBIC).convert("RGB")
    hsv = np.asarray(small.convert("HSV"), dtype=np.float32)
    return float(hsv[..., 1].mean() / 255.0)


def read_image(path, size: tuple[int, int] | None = None, interpolation: str = "bilinear"
               ) -> tuple[np.ndarray, ImageMeta]:
    """Read ``path`` as grayscale uint8 (H, W), resized to ``size`` = (height, width) when given.

    Raises ``ImageReadError`` with a one-line reason for anything unreadable.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as error:
        raise ImageReadError(path, error.strerror or str(error)) from None
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    if stat.st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ImageReadError(path, "permission denied")
    return _decoded(path, None, size, interpolation)


def read_image_bytes(data: bytes, name: str = "upload", size: tuple[int, int] | None = None,
                     interpolation: str = "bilinear") -> tuple[np.ndarray, ImageMeta]:
    """Decode an in-memory upload (image or DICOM) as ``read_image`` decodes a file of that name."""
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    return _decoded(Path(name), bytes(data), size, interpolation)


_reading = threading.local()


def file_being_read():
    """The file (or upload name) this thread is decoding, or None: a decoder's warning (Pillow's "Corrupt EXIF
    data") names no file, and files are read on many threads."""
    return getattr(_reading, "path", None)


@contextmanager
def _reading_file(path: Path):
    outer = getattr(_reading, "path", None)
    _reading.path = path
    try:
        yield
    finally:
        _reading.path = outer


def _decoded(path: Path, data: bytes | None, size, interpolation: str) -> tuple[np.ndarray, ImageMeta]:
    with _reading_file(path):
        return _decoded_here(path, data, size, interpolation)


def _decoded_here(path: Path, data: bytes | None, size, interpolation: str) -> tuple[np.ndarray, ImageMeta]:
    """The one reading path of files (``data`` None) and uploads (their bytes): by content, DICOM or one of the
    image formats; the name only words the refusal of a file that is neither (a PNG called .dcm is read as the
    PNG it is, by predict as by the server, which had answered differently)."""
    if data is None:
        try:
            with open(path, "rb") as handle:
                head = handle.read(132)
        except OSError as error:
            raise ImageReadError(path, error.strerror or str(error)) from None
    else:
        head = data[:132]
    if starts_like_dicom(head):  # the first bytes decide: a 100 MB file of zeros called .dcm is refused at once
        gray, meta = read_dicom(path, data)
    else:
        try:
            gray, meta = _read_pil(path, io.BytesIO(data) if data is not None else None)
        except ImageReadError as error:
            if path.suffix.lower() in DICOM_SUFFIXES and error.reason.startswith("not a readable image"):
                raise ImageReadError(path, NOT_DICOM) from None
            raise
    gray = _one_gray_image(path, gray)
    if size is not None and gray.shape != tuple(size):
        gray = resize_gray(gray, size, interpolation)
    return gray, meta


def _one_gray_image(path: Path, gray) -> np.ndarray:
    """Whatever a reader returns, what goes on is one 2-D uint8 image, or the file's one-line refusal: an array
    of another shape (a colour multi-frame DICOM's four axes) ended the whole run in the resize."""
    if not isinstance(gray, np.ndarray) or gray.ndim != 2 or gray.dtype != np.uint8:
        shape = getattr(gray, "shape", None)
        raise ImageReadError(path, f"decoded to an array of shape {shape} ({getattr(gray, 'dtype', type(gray))}), "
                                   f"not one gray image")
    return gray


def resize_gray(gray: np.ndarray, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    height, width = size
    image = Image.fromarray(gray, mode="L").resize((width, height), RESAMPLING[interpolation])
    return np.asarray(image, dtype=np.uint8)
