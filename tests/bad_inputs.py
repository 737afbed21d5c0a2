"""A corpus of bad and unusual inputs, written on demand; each entry: (file name, expected outcome)."""
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from tests.data.dicom_factory import write_dicom

XRAY_LIKE = (np.clip(np.random.default_rng(0).normal(120, 40, (96, 96)), 0, 255)).astype(np.uint8)


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 96 96\n%%EndComments\n"
       b"0.5 setgray 0 0 96 96 rectfill\nshowpage\n%%EOF\n")


def _png_bytes(array, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def huge_png_header(width=20000, height=20000) -> bytes:
    """A valid PNG whose header claims width x height: decoding it would need gigabytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * (width + 1) * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def write_corpus(folder: Path, xray=XRAY_LIKE) -> dict[str, str]:
    """Write every case into ``folder``; returns name -> 'ok' (must load) or a fragment of the skip reason. The
    readable cases are made from ``xray`` (another one gives other images by content)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = {}

    def put(name, data, outcome):
        (folder / name).write_bytes(data)
        cases[name] = outcome

    jpeg = io.BytesIO()
    Image.fromarray(xray).save(jpeg, format="JPEG")
    jpeg = jpeg.getvalue()
    png = _png_bytes(xray)
    put("zero_bytes.jpeg", b"", "empty file")
    put("truncated.jpeg", jpeg[: len(jpeg) // 3], "truncated")
    put("truncated.png", png[: len(png) // 2], "")
    put("png_named.jpeg", png, "ok")  # wrong extension: decoded by content
    put("text.jpeg", b"This is a text file, not an X-ray.\n" * 20, "not a readable image")
    # formats Pillow opens that no X-ray comes in: PostScript (Pillow runs Ghostscript on it), WebP
    put("postscript.png", EPS, "content is not JPEG, PNG, BMP, TIFF, GIF or DICOM")
    webp = io.BytesIO()
    Image.fromarray(xray).save(webp, format="WEBP")
    put("webp.jpeg", webp.getvalue(), "content is not JPEG, PNG, BMP, TIFF, GIF or DICOM")
    cmyk = io.BytesIO()
    Image.fromarray(xray).convert("CMYK").save(cmyk, format="JPEG")
    put("cmyk.jpeg", cmyk.getvalue(), "ok")
    put("sixteen_bit.png", _png_bytes(xray.astype(np.uint16) * 257), "ok")
    palette = Image.fromarray(xray).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    put("palette_alpha.png", buffer.getvalue(), "ok")
    put("one_pixel.png", _png_bytes(np.zeros((1, 1), np.uint8)), "only 1x1 pixels")
    put("huge_20000.png", huge_png_header(), "decompression-bomb guard")
    gif = io.BytesIO()
    frames = [Image.fromarray(xray), Image.fromarray(255 - xray)]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], loop=0)
    put("animated.gif", gif.getvalue(), "ok")
    write_dicom(folder / "no_pixels.dcm", xray.astype(np.uint16), pixel_data=False)
    cases["no_pixels.dcm"] = "no pixel data"
    write_dicom(folder / "monochrome1.dcm", xray.astype(np.uint16) * 16, photometric="MONOCHROME1")
    cases["monochrome1.dcm"] = "ok"
    good = write_dicom(folder / "tmp.dcm", xray.astype(np.uint16) * 16).read_bytes()
    (folder / "tmp.dcm").unlink()
    put("corrupt.dcm", good[:300] + b"\xff" * 50, "")
    loop = folder / "loop.jpeg"
    loop.symlink_to(loop)  # a symlink loop
    cases["loop.jpeg"] = "symbolic links"
    name = b"caf\xe9_\xff.png"  # not valid UTF-8
    with open(bytes(folder) + b"/" + name, "wb") as handle:
        handle.write(png)
    cases[str(folder / name.decode("utf-8", "surrogateescape")).rsplit("/", 1)[1]] = "ok"
    return cases
