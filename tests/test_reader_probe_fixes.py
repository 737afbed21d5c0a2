"""Defects a probe of the readers found (2026-11-29), each on a real X-ray written to disk: 16-bit colour and
gray+alpha PNGs read by Pillow as their high bytes (12-bit data as 16 grey levels, probabilities moved by up to
0.20), a DICOM whose rescale or window could not be applied read silently without them, a JPEG DICOM whose
codestream has 3 components under SamplesPerPixel 1 scored as some gray image, and the EXIF orientation of a
JPEG that every viewer shows upright ignored (the X-ray was scored lying on its side). Then: 16-bit colour TIFFs
read as their high bytes too (by up to 0.11), or scrambled (separate planes: by up to 0.995), big-endian 16-bit
gray TIFFs refused; a DICOM rescale or window that overflows, is NaN, or leaves every pixel alike gave an
all-black image (scored 0.997), the overflow's numpy warning naming no file."""
import io
import logging
import struct
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps

from pneumonia_cnn.data.readers import read_image, read_image_bytes
from pneumonia_cnn.errors import ImageReadError
from tests.conftest import SHARED_DATA, require_shared
from tests.data.test_reader_defects import write_dicom


@pytest.fixture(scope="module")
def gray():
    """A real X-ray of the shared test split, gray uint8 224x224."""
    require_shared()
    path = sorted((SHARED_DATA / "test" / "NORMAL").glob("*.jpeg"))[0]
    return np.asarray(Image.open(path).convert("L"))


def _paeth(left, up, upleft):
    estimate = left + up - upleft
    near_left, near_up, near_upleft = (np.abs(estimate - x) for x in (left, up, upleft))
    return np.where((near_left <= near_up) & (near_left <= near_upleft), left,
                    np.where(near_up <= near_upleft, up, upleft))


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def write_png16(path, samples: np.ndarray, colour_type: int, interlaced: bool = False):
    """A 16-bit PNG of ``samples`` (rows, columns[, channels]) by hand (Pillow writes no 16-bit colour PNG), its
    rows filtered in turn with each of PNG's five filters (None, Sub, Up, Average, Paeth), as encoders do;
    ``interlaced``: in Adam7's seven passes."""
    height, width = samples.shape[:2]
    images = [samples[y::dy, x::dx] for x, y, dx, dy in ADAM7] if interlaced else [samples]
    rows = []
    for image in (image for image in images if image.size):
        raw = image.astype(">u2").reshape(image.shape[0], -1).view(np.uint8).astype(np.int32)
        step = raw.shape[1] // image.shape[1]  # bytes a pixel: the filters' distance to the left
        up = np.zeros(raw.shape[1], dtype=np.int32)
        for y, row in enumerate(raw):
            left = np.concatenate([np.zeros(step, np.int32), row[:-step]])
            upleft = np.concatenate([np.zeros(step, np.int32), up[:-step]])
            kind = y % 5
            guess = (0, left, up, (left + up) // 2, _paeth(left, up, upleft))[kind]
            rows.append(bytes([kind]) + ((row - guess) % 256).astype(np.uint8).tobytes())
            up = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, int(interlaced))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
                     + chunk(b"IEND", b""))
    return path


def twelve_bit_pngs(folder, gray: np.ndarray) -> dict:
    """The same 12-bit X-ray as a 16-bit gray PNG (Pillow's 'I;16') and as 16-bit RGB (also interlaced), RGBA and
    gray+alpha PNGs (opaque), by name."""
    twelve = np.round(gray.astype(np.float64) * 4095 / 255).astype(np.uint16)
    opaque = np.full_like(twelve, 65535)
    paths = {"gray": folder / "gray.png"}
    Image.fromarray(twelve).save(paths["gray"])
    for name, samples, colour_type in (("rgb", np.stack([twelve] * 3, -1), 2),
                                       ("rgba", np.stack([twelve] * 3 + [opaque], -1), 6),
                                       ("la", np.stack([twelve, opaque], -1), 4)):
        paths[name] = write_png16(folder / f"{name}.png", samples, colour_type)
    paths["rgb_interlaced"] = write_png16(folder / "rgb_interlaced.png", np.stack([twelve] * 3, -1), 2, True)
    return paths


# ---------- 1. 16-bit colour and gray+alpha PNGs


def test_12_bit_data_in_16_bit_colour_pngs_is_read_as_the_16_bit_gray_png(gray, tmp_path):
    """All 16 bits are read: each file gives the 8-bit X-ray back exactly, as the gray 16-bit PNG does (it came
    out as 16-17 grey levels, the high byte only), from a file and from an upload alike."""
    paths = twelve_bit_pngs(tmp_path, gray)
    assert Image.open(paths["gray"]).mode == "I;16" and Image.open(paths["rgb"]).mode == "RGB"
    for name, path in paths.items():
        pixels, meta = read_image(path)
        assert np.array_equal(pixels, gray), (name, len(np.unique(pixels)))
        assert meta.original_size == gray.shape
        assert np.array_equal(read_image_bytes(path.read_bytes(), path.name)[0], gray), name


def test_12_bit_colour_pngs_score_as_the_gray_png_with_the_built_in_model(gray, tmp_path):
    """The probe's figure: 0.5860 against 0.3891 for one X-ray. The same probability to 1e-6 now."""
    from pneumonia_cnn.inference import Predictor
    paths = twelve_bit_pngs(tmp_path, gray)
    predictions = Predictor("builtin", "cpu").predict_files([str(p) for p in paths.values()])
    probabilities = [p.probability for p in predictions]
    assert all(p.error is None for p in predictions)
    assert np.allclose(probabilities, probabilities[0], rtol=0, atol=1e-6), probabilities


def test_16_bit_colour_is_made_gray_as_pillow_does_8_bit_colour(gray, tmp_path):
    """Distinct channels: Pillow's weights (R 19595, G 38470, B 7471 of 65536, rounded), so 16-bit RGB holding
    8-bit values reads as the 8-bit RGB PNG of them; full-range 16-bit colour by x / 257 as gray 16-bit; alpha
    over black, as for 8-bit images (transparent: 0)."""
    colour = np.stack([gray, np.roll(gray, 7, axis=1), 255 - gray], -1)
    Image.fromarray(colour).save(tmp_path / "rgb8.png")
    eight_bits = write_png16(tmp_path / "rgb16_8bit.png", colour.astype(np.uint16), 2)
    assert np.array_equal(read_image(eight_bits)[0], read_image(tmp_path / "rgb8.png")[0])
    full = colour.astype(np.uint64) * 257
    expected16 = (full[..., 0] * 19595 + full[..., 1] * 38470 + full[..., 2] * 7471 + 32768) >> 16
    expected = ((expected16 * 510 + 65535) // (2 * 65535)).astype(np.uint8)
    assert np.array_equal(read_image(write_png16(tmp_path / "rgb16.png", full, 2))[0], expected)
    alpha = np.zeros(gray.shape, dtype=np.uint16)
    alpha[:, :112] = 65535  # left half opaque, right half transparent
    twelve = np.round(gray.astype(np.float64) * 4095 / 255).astype(np.uint16)
    for name, samples, colour_type in (("la", np.stack([twelve, alpha], -1), 4),
                                       ("rgba", np.stack([twelve] * 3 + [alpha], -1), 6)):
        pixels = read_image(write_png16(tmp_path / f"{name}.png", samples, colour_type))[0]
        assert np.array_equal(pixels[:, :112], gray[:, :112]) and not pixels[:, 112:].any(), name


# ---------- 2. a DICOM rescale or window that cannot be applied


NOT_DS = ("abc", "NaN", "inf")  # texts pydicom will not write as a decimal string (it logs, or refuses)


def _dicom_with(path, pixels, **texts):
    """A 12-bit DICOM whose elements hold these texts; one of ``NOT_DS`` is written as 7.5, then those header bytes
    replaced (the first occurrence: the header comes before the pixels)."""
    odd = [text for text in texts.values() if text in NOT_DS]
    assert len(odd) <= 1
    write_dicom(path, pixels, BitsStored=12, HighBit=11,
                **{name: "7.5" if text in NOT_DS else text for name, text in texts.items()})
    if odd:
        path.write_bytes(path.read_bytes().replace(b"7.5", odd[0].encode(), 1))
    return path


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _assert_read_unscaled_with_one_warning(path, twelve, caplog, said):
    """The stored values min-max scaled (what was skipped left out), and one warning line naming the file."""
    caplog.set_level(logging.WARNING)
    pixels, meta = read_image(path)
    low, high = int(twelve.min()), int(twelve.max())
    stored = np.round((twelve.astype(np.float64) - low) * (255 / (high - low))).astype(np.uint8)
    assert meta.source_format == "DICOM" and np.array_equal(pixels, stored)
    assert _warnings(caplog) == [f"warning: {path}: {said}"]


@pytest.mark.parametrize("texts, said", [
    ({"RescaleSlope": "abc", "RescaleIntercept": "0", "WindowCenter": "100", "WindowWidth": "50"},
     "modality LUT not applied (RescaleSlope 'abc' is not a number): stored pixel values used, without the window"),
    ({"RescaleSlope": "abc"},
     "modality LUT not applied (RescaleSlope 'abc' is not a number): stored pixel values used, without the window"),
    ({"WindowCenter": "abc", "WindowWidth": "50"},
     "VOI LUT / window not applied (WindowCenter 'abc' is not a number): the full range of values used"),
])
def test_a_rescale_or_window_that_cannot_be_applied_is_the_files_warning(gray, tmp_path, caplog, texts, said):
    """The stored values are still read (min-max), as before; what was skipped and why is one line naming the
    file (it was silent, and the window dropped)."""
    twelve = gray.astype(np.uint16) * 16
    path = _dicom_with(tmp_path / "bad_lut.dcm", twelve, **texts)
    assert b"abc" in path.read_bytes()
    _assert_read_unscaled_with_one_warning(path, twelve, caplog, said)


def test_a_dicom_whose_luts_apply_has_no_warning(gray, tmp_path, caplog):
    path = _dicom_with(tmp_path / "good.dcm", gray.astype(np.uint16) * 16, RescaleSlope="1", RescaleIntercept="0",
                       WindowCenter="2048", WindowWidth="4096")
    caplog.set_level(logging.WARNING)
    read_image(path)
    assert _warnings(caplog) == []


# ---------- 3. a compressed frame with another number of components than the header says


def _jpeg_dicom(path, gray, frame: np.ndarray, samples: int):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit
    write_dicom(path, gray)
    dataset = pydicom.dcmread(path)
    encoded = io.BytesIO()
    Image.fromarray(frame).save(encoded, "JPEG", quality=95)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([encoded.getvalue()])
    dataset["PixelData"].VR = "OB"
    dataset.SamplesPerPixel = samples
    if samples == 3:
        dataset.PhotometricInterpretation, dataset.PlanarConfiguration = "YBR_FULL_422", 0
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_a_3_component_jpeg_under_samples_per_pixel_1_is_refused_in_one_line(gray, tmp_path):
    """Pillow refused it, then GDCM read it and it was scored: the header and the pixels disagree."""
    colour = np.stack([gray] * 3, -1)
    path = _jpeg_dicom(tmp_path / "three_in_one.dcm", gray, colour, samples=1)
    with pytest.raises(ImageReadError) as raised:
        read_image(path)
    assert str(raised.value) == (f"{path}: compressed frame has 3 colour component(s), but the DICOM header says "
                                 f"SamplesPerPixel 1 (not decoded: the header and the pixels disagree)")
    for name, frame, samples in (("gray.dcm", gray, 1), ("colour.dcm", colour, 3)):  # agreeing: read as before
        pixels, _ = read_image(_jpeg_dicom(tmp_path / name, gray, frame, samples))
        assert np.abs(pixels.astype(int) - gray.astype(int)).mean() < 3, name


def test_component_counts_are_read_from_jpeg_and_jpeg_2000_headers():
    from pneumonia_cnn.data.dicom import _components
    app0 = b"\xff\xe0\x00\x10" + b"JFIF\0" + bytes(9)
    frame = b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10\x03" + bytes(9)
    assert _components(b"\xff\xd8" + app0 + frame) == 3
    assert _components(b"\xff\xd8\xff" + frame.replace(b"\xc0", b"\xf7", 1)[:9] + b"\x01") == 1  # fill, JPEG-LS
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + struct.pack(">8I", 16, 16, 0, 0, 16, 16, 0, 0) + b"\x00\x03"
    assert _components(siz) == 3 and _components(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"jp2c" + siz) == 3
    assert _components(b"\xff\xd8" + app0) is None and _components(b"not a codestream") is None


# ---------- 4. EXIF orientation


# stored pixels of an upright image tagged with each orientation: what undoes that orientation's transpose
STORED = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_a_file_tagged_with_an_exif_orientation_reads_as_the_upright_file(gray, tmp_path, orientation):
    """The model sees what a viewer shows (Pillow's ImageOps.exif_transpose); the size is the upright one."""
    upright = Image.fromarray(gray[:, :180])  # not square: a quarter turn shows
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = tmp_path / f"tagged{orientation}.png"
    upright.transpose(STORED[orientation]).save(tagged, exif=exif)
    assert Image.open(tagged).getexif()[0x0112] == orientation
    pixels, meta = read_image(tagged)
    expected, upright_meta = read_image(tmp_path / "upright.png")
    assert np.array_equal(pixels, expected) and meta.original_size == upright_meta.original_size == (224, 180)
    assert np.array_equal(read_image_bytes(tagged.read_bytes(), tagged.name)[0], expected)


def test_a_jpeg_tagged_rotate_90_reads_as_a_viewer_shows_it(gray, tmp_path):
    """The probe's case: a JPEG with orientation 6, upright in every viewer, was scored sideways."""
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = tmp_path / "rot6.jpeg"
    Image.fromarray(gray[:, :180]).transpose(Image.Transpose.ROTATE_90).save(tagged, quality=95, exif=exif)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(tagged)).convert("L"))
    pixels, meta = read_image(tagged, size=(224, 180))
    assert shown.shape == (224, 180) and meta.original_size == (224, 180)
    assert np.array_equal(pixels, shown)
    assert np.abs(pixels.astype(int) - gray[:, :180].astype(int)).mean() < 3  # the X-ray, upright


# ---------- 5. 16-bit colour TIFFs (and big-endian or gray+alpha 16-bit TIFFs)


def _twelve_bit(gray: np.ndarray) -> np.ndarray:
    return np.round(gray.astype(np.float64) * 4095 / 255).astype(np.uint16)


# name -> (layout of the samples, tifffile's arguments): as scanners, ImageJ (big-endian) and libtiff write them
TIFF16 = {"rgb": ("rgb", {}), "rgb_big_endian": ("rgb", {"byteorder": ">"}),
          "rgb_planes": ("planes", {"planarconfig": "separate"}),
          "rgb_deflate": ("rgb", {"compression": "zlib", "predictor": True}),
          "rgb_tiled": ("rgb", {"tile": (64, 64)}), "rgb_strips": ("rgb", {"rowsperstrip": 7}),
          "rgba": ("rgba", {"extrasamples": ["unassalpha"]}),
          "gray_big_endian": ("gray", {"byteorder": ">"}), "gray": ("gray", {})}


def write_tiff16(path, gray16: np.ndarray, layout: str, **options):
    import tifffile  # scikit-image's dependency: writes what Pillow cannot (16-bit colour)
    opaque = np.full_like(gray16, 65535)
    samples = {"gray": gray16, "rgb": np.stack([gray16] * 3, -1), "planes": np.stack([gray16] * 3),
               "rgba": np.stack([gray16] * 3 + [opaque], -1)}[layout]
    tifffile.imwrite(path, samples, photometric="minisblack" if layout == "gray" else "rgb", **options)
    return path


@pytest.mark.parametrize("name", sorted(TIFF16))
def test_12_bit_data_in_16_bit_tiffs_is_read_at_full_depth(gray, tmp_path, name):
    """Each gives the 8-bit X-ray back exactly, as the 16-bit gray TIFF does, from a file and from an upload: Pillow
    kept the high byte of 16-bit colour (16 grey levels), read separate 16-bit planes as bytes from the wrong
    places (scored 0.995 against 0.05), and refused a big-endian 16-bit gray TIFF ("image has wrong mode")."""
    layout, options = TIFF16[name]
    path = write_tiff16(tmp_path / f"{name}.tif", _twelve_bit(gray), layout, **options)
    pixels, meta = read_image(path)
    assert np.array_equal(pixels, gray), (name, len(np.unique(pixels)))
    assert meta.source_format == "TIFF" and meta.original_size == gray.shape
    assert np.array_equal(read_image_bytes(path.read_bytes(), path.name)[0], gray), name


def test_12_bit_colour_tiffs_score_as_the_gray_tiff_with_the_built_in_model(gray, tmp_path):
    from pneumonia_cnn.inference import Predictor
    paths = [write_tiff16(tmp_path / f"{name}.tif", _twelve_bit(gray), TIFF16[name][0], **TIFF16[name][1])
             for name in ("gray", "rgb", "rgb_planes", "rgb_deflate")]
    predictions = Predictor("builtin", "cpu").predict_files([str(p) for p in paths])
    probabilities = [p.probability for p in predictions]
    assert all(p.error is None for p in predictions)
    assert np.allclose(probabilities, probabilities[0], rtol=0, atol=1e-6), probabilities


def test_16_bit_colour_tiff_is_made_gray_as_the_16_bit_colour_png(gray, tmp_path):
    """Distinct 12-bit channels, and alpha: unassociated composited over black, associated (premultiplied: already
    over black) taken as it is, in one plane or separate planes, read as the same samples in a PNG."""
    import tifffile
    colour = _twelve_bit(np.stack([gray, np.roll(gray, 7, axis=1), 255 - gray], -1))
    alpha = np.zeros(gray.shape, dtype=np.uint16)
    alpha[:, :56] = 65535  # opaque, then half transparent (where compositing twice would halve again), transparent
    alpha[:, 56:112] = 32768
    rgba = np.concatenate([colour, alpha[..., None]], -1)
    expected = read_image(write_png16(tmp_path / "rgba.png", rgba, 6))[0]
    assert not expected[:, 112:].any() and expected[:, :56].any()
    assert np.array_equal(read_image(write_png16(tmp_path / "rgb.png", colour, 2))[0][:, :56], expected[:, :56])
    for name, extra, planar in (("unassociated", "unassalpha", "contig"), ("associated", "assocalpha", "contig"),
                                ("planes", "unassalpha", "separate")):
        samples = rgba
        if extra == "assocalpha":  # premultiplied: each colour sample already times its alpha
            premultiplied = (colour.astype(np.uint64) * alpha[..., None] + 32767) // 65535
            samples = np.concatenate([premultiplied.astype(np.uint16), alpha[..., None]], -1)
        samples = samples if planar == "contig" else np.moveaxis(samples, -1, 0)
        path = tmp_path / f"{name}.tif"
        tifffile.imwrite(path, samples, photometric="rgb", extrasamples=[extra], planarconfig=planar)
        read = read_image(path)[0].astype(int)
        # premultiplying each channel before the gray weights rounds apart from compositing the gray: 1 level
        assert np.abs(read - expected).max() <= (1 if extra == "assocalpha" else 0), name


def test_16_bit_tiffs_pillow_cannot_decode_are_refused_in_one_line_naming_the_layout(gray, tmp_path):
    """Compressed separate 16-bit colour planes (Pillow's libtiff reader keeps their high bytes whatever it is
    asked) and 16-bit gray+alpha (Pillow opens none): refused, never scored at 4 bits, nor said to be no TIFF."""
    import tifffile
    twelve = _twelve_bit(gray)
    planes = write_tiff16(tmp_path / "planes.tif", twelve, "planes", planarconfig="separate", compression="zlib")
    gray_alpha = tmp_path / "gray_alpha.tif"
    tifffile.imwrite(gray_alpha, np.stack([twelve, np.full_like(twelve, 65535)], -1), photometric="minisblack",
                     extrasamples=["unassalpha"])
    said = {planes: "16-bit colour TIFF of compressed separate colour planes: only the high byte of each sample "
                    "can be decoded (save it as 16-bit gray TIFF or PNG)",
            gray_alpha: "TIFF this reader cannot decode (SamplesPerPixel 2, BitsPerSample 16/16, "
                        "PhotometricInterpretation 1, ExtraSamples 2); save it as gray PNG or TIFF"}
    for path, reason in said.items():
        with pytest.raises(ImageReadError) as raised:
            read_image(path)
        assert str(raised.value) == f"{path}: {reason}"
        with pytest.raises(ImageReadError) as raised:
            read_image_bytes(path.read_bytes(), "upload.tif")
        assert str(raised.value) == f"upload.tif: {reason}"


# ---------- 6. a DICOM rescale or window whose result is no image (overflow, NaN, every pixel alike)


RESCALE_SKIPPED = "modality LUT not applied ({}): stored pixel values used, without the window"
WINDOW_SKIPPED = "VOI LUT / window not applied ({}): the full range of values used"


@pytest.mark.parametrize("texts, said", [
    ({"RescaleSlope": "1e308", "RescaleIntercept": "0"},  # every pixel but 0 and 1 overflows: all black
     RESCALE_SKIPPED.format("RescaleSlope 1e308, RescaleIntercept 0: the values overflow to inf or NaN")),
    ({"RescaleSlope": "-1e308", "RescaleIntercept": "0", "WindowCenter": "100", "WindowWidth": "50"},
     RESCALE_SKIPPED.format("RescaleSlope -1e308, RescaleIntercept 0: the values overflow to inf or NaN")),
    ({"RescaleSlope": "1e305", "RescaleIntercept": "0"},  # the brighter half overflows: scored 0.96 against 0.03
     RESCALE_SKIPPED.format("RescaleSlope 1e305, RescaleIntercept 0: the values overflow to inf or NaN")),
    ({"RescaleSlope": "1e-320", "RescaleIntercept": "0"},  # subnormal: no scale to 0-255 exists (NaN, all black)
     RESCALE_SKIPPED.format("RescaleSlope 1e-320, RescaleIntercept 0: the values span 4.01596e-317, beyond "
                            "floating point")),
    ({"RescaleSlope": "0", "RescaleIntercept": "5"},
     RESCALE_SKIPPED.format("RescaleSlope 0, RescaleIntercept 5: every pixel becomes 5")),
    ({"WindowCenter": "NaN", "WindowWidth": "400"}, WINDOW_SKIPPED.format("WindowCenter 'NaN' is not a number")),
    ({"WindowCenter": "inf", "WindowWidth": "400"}, WINDOW_SKIPPED.format("WindowCenter 'inf' is not a number")),
    ({"WindowCenter": "2048", "WindowWidth": "inf"}, WINDOW_SKIPPED.format("WindowWidth 'inf' is not a number")),
    ({"WindowCenter": "2048", "WindowWidth": "1e308"},
     WINDOW_SKIPPED.format("WindowCenter 2048, WindowWidth 1e308: every pixel becomes 2047.5")),
    ({"WindowCenter": "1e308", "WindowWidth": "400", "VOILUTFunction": "SIGMOID"},
     WINDOW_SKIPPED.format("WindowCenter 1e308, WindowWidth 400: every pixel becomes 0")),
    ({"WindowCenter": "2048", "WindowWidth": "0"}, WINDOW_SKIPPED.format(
        "The (0028,1051) Window Width must be greater than or equal to 1 for a 'LINEAR' windowing operation")),
    ({"WindowCenter": "2048", "WindowWidth": "-100", "VOILUTFunction": "SIGMOID"}, WINDOW_SKIPPED.format(
        "The (0028,1051) Window Width must be greater than 0 for a 'SIGMOID' windowing operation")),
], ids=["slope_1e308", "slope_-1e308", "slope_1e305", "slope_1e-320", "slope_0", "center_nan", "center_inf",
        "width_inf", "width_1e308", "sigmoid_center_1e308", "width_0", "sigmoid_width_-100"])
def test_a_rescale_or_window_giving_no_image_is_skipped_with_the_files_warning(gray, tmp_path, caplog, recwarn,
                                                                               texts, said):
    """Read without it (the stored values, min-max), one line naming the file and why, and no numpy warning: an
    overflowing rescale gave an all-black image (scored 0.997, "not an X-ray") with "RuntimeWarning: overflow
    encountered in multiply" naming no file; a NaN or infinite window, or one that left every pixel alike, gave
    an all-black image without a word."""
    twelve = gray.astype(np.uint16) * 16
    path = _dicom_with(tmp_path / "overflow.dcm", twelve, **texts)
    _assert_read_unscaled_with_one_warning(path, twelve, caplog, said)
    assert [str(w.message) for w in recwarn] == []


def test_extreme_but_usable_rescale_and_window_are_applied_without_a_word(gray, tmp_path, caplog, recwarn):
    """Huge or tiny factors whose result is still an image, and a sigmoid so steep that exp() overflows: used."""
    twelve = gray.astype(np.uint16) * 16
    for name, texts in (("huge", {"RescaleSlope": "1e300", "RescaleIntercept": "-1e302"}),
                        ("tiny", {"RescaleSlope": "1e-300", "RescaleIntercept": "0"}),
                        ("steep", {"WindowCenter": "2048", "WindowWidth": "1e-300", "VOILUTFunction": "SIGMOID"})):
        caplog.clear()
        pixels = read_image(_dicom_with(tmp_path / f"{name}.dcm", twelve, **texts))[0]
        assert len(np.unique(pixels)) > 1 and _warnings(caplog) == [], name
    assert [str(w.message) for w in recwarn] == []


def test_the_command_line_says_one_line_for_an_overflowing_rescale(gray, tmp_path):
    from tests.data.test_reader_defects import run_cli
    path = _dicom_with(tmp_path / "slope.dcm", gray.astype(np.uint16) * 16, RescaleSlope="1e308",
                       RescaleIntercept="0")
    code, out, err = run_cli("predict", "builtin", path)
    assert code == 0 and "not an X-ray" not in out, out
    assert err.splitlines() == [f"warning: {path}: " + RESCALE_SKIPPED.format(
        "RescaleSlope 1e308, RescaleIntercept 0: the values overflow to inf or NaN")], err
