"""Defects a hostile probe of the readers found (2026-11-27), each on real X-rays written to disk: a colour
multi-frame DICOM that ended the whole run, predict and the server deciding a file's format differently, library
messages on stderr that named no file, and a large non-DICOM file called .dcm read whole before its refusal."""
import io
import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from pneumonia_cnn.data.readers import read_image, read_image_bytes
from pneumonia_cnn.errors import ImageReadError
from tests.conftest import SHARED_DATA, require_shared
from tests.data.dicom_factory import jpeg_head


@pytest.fixture(scope="module")
def xray():
    """(path, gray pixels) of a real X-ray of the shared test split."""
    require_shared()
    path = sorted((SHARED_DATA / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    return path, np.asarray(Image.open(path).convert("L"))


def write_dicom(path, pixels, photometric="MONOCHROME2", frames=None, syntax=ExplicitVRLittleEndian, preamble=True,
                **tags):
    """``pixels``: (rows, columns), (rows, columns, 3), or with ``frames`` a first axis of frames."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientAge = "DX", "CHEST", "PA", "003Y"
    colour = pixels.shape[-1] == 3
    if frames:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[1:3] if frames else pixels.shape[:2]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:  # the data set alone, as some modalities write it: no preamble, no 'DICM', no file meta
        del ds.file_meta
        ds.preamble = None
        ds.save_as(path, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return path


def run_cli(*arguments):
    """A real ``pneumonia-cnn`` process (its own logging and warnings set-up): (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", *map(str, arguments)], capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


# ---------- 1. a colour multi-frame DICOM


def test_a_colour_multi_frame_dicom_is_read_as_its_first_frame(xray, tmp_path):
    """2 frames of RGB: pydicom gives (frames, rows, columns, 3), and only gray multi-frame files had their
    first frame taken; the 4-D array reached the resize ("Cannot handle this data type: (1, 1, 224, 3)")."""
    _, gray = xray
    rgb = np.repeat(gray[..., None], 3, axis=2)
    frames = write_dicom(tmp_path / "frames.dcm", np.stack([rgb, 255 - rgb]), "RGB", frames=2)
    single = write_dicom(tmp_path / "single.dcm", rgb, "RGB")
    first, meta = read_image(frames, (224, 224))
    assert first.shape == (224, 224) and meta.source_format == "DICOM"
    assert (first == read_image(single, (224, 224))[0]).all()
    upload, _ = read_image_bytes(frames.read_bytes(), "frames.dcm", (224, 224))  # the server's way in
    assert (upload == first).all()


def test_predict_scores_a_colour_multi_frame_dicom_and_the_other_files(xray, tmp_path):
    """The traceback had cost the whole run: no row for the good JPEG beside it either."""
    path, gray = xray
    rgb = np.repeat(gray[..., None], 3, axis=2)
    frames = write_dicom(tmp_path / "frames.dcm", np.stack([rgb, rgb]), "RGB", frames=2)
    code, out, err = run_cli("predict", "builtin", frames, path, "--format", "csv", "--engine", "torch")
    assert code == 0 and "Traceback" not in err, err
    rows = out.strip().splitlines()[1:]
    assert len(rows) == 2 and all(",PNEUMONIA," in row or ",NORMAL," in row for row in rows), out


def test_an_array_of_another_shape_from_a_reader_is_that_files_refusal(xray, tmp_path, monkeypatch):
    """Defence in depth: whatever a reader returns, only one 2-D uint8 image goes on; anything else is the file's
    one-line reason, and the files beside it are still decoded."""
    from pneumonia_cnn.data import readers
    from pneumonia_cnn.inference.bundle import Preprocessing
    from pneumonia_cnn.inference.files import decode_files
    path, gray = xray
    odd = write_dicom(tmp_path / "odd.dcm", gray)
    monkeypatch.setattr(readers, "read_dicom", lambda *_: (np.zeros((1, 1, 224, 3), np.uint8), None))
    with pytest.raises(ImageReadError, match=r"odd.dcm: decoded to an array of shape \(1, 1, 224, 3\) \(uint8\), "
                                             r"not one gray image$"):
        read_image(odd, (224, 224))
    decoded = [item for chunk in decode_files([odd, path], Preprocessing((224, 224), 1)) for item in chunk]
    assert decoded[0].pixels is None and "not one gray image" in decoded[0].error
    assert decoded[1].error is None and decoded[1].pixels.shape == (224, 224)


def test_decoding_keeps_only_images_of_the_models_size(xray, tmp_path, monkeypatch):
    """The last line of defence before the chunk is stacked: a preprocessing step that returned another shape is
    that file's row, not the end of predict."""
    from pneumonia_cnn.inference.bundle import Preprocessing
    from pneumonia_cnn.inference.files import decode_files
    path, _ = xray
    odd = tmp_path / "odd.jpeg"
    odd.write_bytes(path.read_bytes())
    read_path = Preprocessing.read_path

    def read_oddly(self, name):
        pixels, meta = read_path(self, name)
        return (pixels[None, None, :, :, None] if name == str(odd) else pixels), meta
    monkeypatch.setattr(Preprocessing, "read_path", read_oddly)
    decoded = [item for chunk in decode_files([odd, path], Preprocessing((224, 224), 1)) for item in chunk]
    assert decoded[0].pixels is None
    assert decoded[0].error == "decoded to an array of shape (1, 1, 224, 224, 1), not one 224x224 gray image"
    assert decoded[1].error is None and decoded[1].pixels.shape == (224, 224)


# ---------- 3. one reading path for files and uploads


def test_a_file_and_its_upload_are_decoded_alike(xray, tmp_path):
    """By content, whatever the name: a PNG called .dcm was refused by predict ("not a DICOM file") and scored by
    the server; a DICOM without its preamble called .jpeg is DICOM to both; the name words only a refusal."""
    path, gray = xray
    Image.fromarray(gray).save(tmp_path / "png_as.dcm", format="PNG")
    write_dicom(tmp_path / "bare.jpeg", (gray.astype(np.uint16) * 16), preamble=False)
    (tmp_path / "text.dcm").write_text("This is a text file, not a DICOM.\n")
    (tmp_path / "good.jpeg").write_bytes(path.read_bytes())
    outcomes = {}
    for file in sorted(tmp_path.iterdir()):
        as_file = outcome(read_image, file, (224, 224))
        assert as_file == outcome(read_image_bytes, file.read_bytes(), file.name, (224, 224)), file.name
        outcomes[file.name] = as_file
    assert outcomes["png_as.dcm"][1] == "PNG" and outcomes["bare.jpeg"][1] == "DICOM"
    assert outcomes["png_as.dcm"][0] == outcomes["good.jpeg"][0]  # the same X-ray, read as the PNG it is
    assert outcomes["text.dcm"] == "not a DICOM file (no DICM header and no image description)"


def outcome(read, *arguments):
    """(pixels, format) of a read, or its reason for refusing."""
    try:
        pixels, meta = read(*arguments)
        return pixels.tobytes(), meta.source_format
    except ImageReadError as error:
        return error.reason


# ---------- 4. what reaches stderr names the file


def test_a_pydicom_warning_is_one_line_naming_the_file(xray, tmp_path):
    """NumberOfFrames 0: pydicom's warning was printed three times (its log line, the warning, the log line
    again), none naming the file."""
    _, gray = xray
    path = write_dicom(tmp_path / "frames0.dcm", gray.astype(np.uint16) * 16, NumberOfFrames="0")
    code, out, err = run_cli("predict", "builtin", path, "--engine", "torch")
    about = [line for line in err.splitlines() if "Number of Frames" in line]
    assert code == 0 and len(about) == 1 and str(path) in about[0], err
    assert "frames0.dcm" in out and "unreadable" not in out


def _tiff_with_an_overlong_tag(gray: np.ndarray, path) -> None:
    """A TIFF whose RowsPerStrip (278) claims 1,000 values: Pillow warns "Metadata Warning, tag 278 had too many
    entries" and reads the image."""
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="TIFF")
    data = bytearray(buffer.getvalue())
    first_entry = int.from_bytes(data[4:8], "little") + 2
    count = int.from_bytes(data[first_entry - 2:first_entry], "little")
    entries = [first_entry + 12 * index for index in range(count)]
    rows_per_strip = next(at for at in entries if int.from_bytes(data[at:at + 2], "little") == 278)
    data[rows_per_strip + 4:rows_per_strip + 8] = (1000).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_a_pillow_warning_names_the_file_it_came_from(xray, tmp_path):
    """Pillow's warnings about a file's metadata came as "warning: UserWarning: Metadata Warning, tag 278 ...",
    naming no file; of two such files in one run, each now has its own line."""
    _, gray = xray
    first, second = tmp_path / "first.tif", tmp_path / "second.tif"
    _tiff_with_an_overlong_tag(gray, first)
    _tiff_with_an_overlong_tag(gray, second)
    code, out, err = run_cli("predict", "builtin", first, second, "--engine", "torch")
    about = sorted(line for line in err.splitlines() if "tag 278" in line)
    assert code == 0 and about == [f"warning: {first}: UserWarning: Metadata Warning, tag 278 had too many "
                                   f"entries: 1000, expected 1", f"warning: {second}: UserWarning: Metadata "
                                   f"Warning, tag 278 had too many entries: 1000, expected 1"], err
    assert "first.tif" in out and "second.tif" in out and "unreadable" not in out


def test_a_corrupt_jpeg_dicom_has_its_own_line_and_gdcms_lines_are_left_on_stderr(xray, tmp_path):
    """A DICOM that claims JPEG baseline and holds garbage: the file's one line says why it was skipped, and the
    good file beside it is scored. GDCM's libjpeg prints "Corrupt JPEG data: 7 extraneous bytes before marker
    0xd9" and "JPEG datastream contains no image" itself, from C: they are left on stderr (pointing file
    descriptor 2 elsewhere for the call took what other threads logged meanwhile)."""
    pytest.importorskip("gdcm")
    path, gray = xray
    bad = write_dicom(tmp_path / "fake_jpeg.dcm", gray)
    dataset = pydicom.dcmread(bad)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([jpeg_head(224, 224) + b"garbage\xff\xd9"])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(bad, enforce_file_format=True)
    code, out, err = run_cli("predict", "builtin", bad, path, "--engine", "torch")
    skipped = (f"skipped {bad}: cannot decode DICOM pixel data (gdcm: cannot decode the compressed data; pillow: "
               f"cannot load this image)")
    lines = err.strip().splitlines()
    assert code == 0 and skipped in lines and "Traceback" not in err, err
    assert all("JPEG" in line and "fake_jpeg" not in line for line in lines if line != skipped), err
    assert path.name in out


def test_a_12_bit_jpeg_dicom_names_the_decoder_to_install(xray, tmp_path):
    """JPEG Extended 12-bit: no installed decoder reads it; the reason was cut with "…" before the end and did not
    say what would read it, as the README does."""
    pytest.importorskip("gdcm")
    if any(plugin == "pylibjpeg" for plugin in _plugins_for_12_bit()):
        pytest.skip("pylibjpeg is installed here: the file is read")
    _, gray = xray
    path = write_dicom(tmp_path / "jpeg12.dcm", gray.astype(np.uint16) * 16, BitsStored=12, HighBit=11)
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.51"  # JPEG Extended (Process 2 and 4)
    dataset.PixelData = encapsulate([jpeg_head(224, 224, 0xC1, precision=12) + bytes(100) + b"\xff\xd9"])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError) as raised:
        read_image(path)
    reason = raised.value.reason
    assert reason.endswith("; to read it: pip install pylibjpeg pylibjpeg-libjpeg)") and "…" not in reason, reason
    assert "12-bit precision" in reason


def _plugins_for_12_bit():
    from pydicom.pixels import get_decoder
    return get_decoder("1.2.840.10008.1.2.4.51").available_plugins


# ---------- 5. a large file that is no DICOM


@pytest.mark.parametrize("start", [b"", b"\x08\x00", b"\x10\x00", b"\x28\x00", b"\x28\x00\x10\x00"],
                         ids=["zeros", "zeros-after-08-00", "0010", "0028", "rows"])
def test_a_large_file_called_dcm_that_is_no_dicom_is_refused_from_its_first_bytes(tmp_path, start):
    """100 MB of zeros called z.dcm took 19 s and 420 MB: read whole, then parsed by pydicom as millions of empty
    elements. Zeros after 08 00 (a data set's first group) are (0008,0000) then (0000,0000): no DICOM orders its
    tags so. Both are refused from their first bytes (sparse files: the test writes nothing)."""
    path = tmp_path / "z.dcm"
    with open(path, "wb") as handle:
        handle.write(start)
        handle.truncate(60_000_000)
    began = time.perf_counter()
    with pytest.raises(ImageReadError, match=r"z.dcm: not a DICOM file \(no DICM header and no image description\)$"):
        read_image(path, (224, 224))
    assert time.perf_counter() - began < 1.0


def test_a_dicom_data_set_without_its_preamble_is_still_read(xray, tmp_path):
    """What the first bytes must show: a data set written without preamble and file meta, implicit VR, starting
    at group 0008, is read as before (by content, under any name)."""
    _, gray = xray
    path = write_dicom(tmp_path / "bare.img", gray.astype(np.uint16) * 16, syntax=ImplicitVRLittleEndian,
                       preamble=False)
    assert path.read_bytes()[:2] == b"\x08\x00"
    pixels, meta = read_image(path, (224, 224))
    assert meta.source_format == "DICOM" and pixels.std() > 10
    assert (read_image_bytes(io.BytesIO(path.read_bytes()).getvalue(), "x", (224, 224))[0] == pixels).all()


# ---------- 5. a compressed frame larger than its header says


def _jpeg_dicom(path, gray, frame: np.ndarray, syntax=JPEGBaseline8Bit, codec="JPEG"):
    """A DICOM whose header describes ``gray`` and whose one compressed frame is ``frame``."""
    write_dicom(path, gray)
    dataset = pydicom.dcmread(path)
    encoded = io.BytesIO()
    Image.fromarray(frame).save(encoded, codec, **({"quality": 90} if codec == "JPEG" else {"no_jp2": True}))
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.PixelData = encapsulate([encoded.getvalue()])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax, codec", [(JPEGBaseline8Bit, "JPEG"), ("1.2.840.10008.1.2.4.90", "JPEG2000")])
def test_a_frame_larger_than_the_header_is_refused_before_decoding(xray, tmp_path, syntax, codec):
    """An 18 MB file whose header said 224x224 over a 40000x40000 JPEG took 5 GB in predict, listen and pacs:
    decoders follow the codestream, and the shapes were compared only after. The codestream's own size is
    checked first now; a frame that matches its header is read as before, to the same pixels."""
    path, gray = xray
    large = np.asarray(Image.fromarray(gray).resize((3000, 2000)))
    bomb = _jpeg_dicom(tmp_path / "bomb.dcm", gray, large, syntax, codec)
    with pytest.raises(ImageReadError) as raised:
        read_image(bomb)
    assert raised.value.reason == ("compressed frame is 3000x2000 pixels, but the DICOM header says 224x224 "
                                   "(not decoded)")
    honest = _jpeg_dicom(tmp_path / "honest.dcm", gray, gray, syntax, codec)
    pixels, meta = read_image(honest)
    assert meta.source_format == "DICOM" and pixels.shape == (224, 224)
    assert np.abs(pixels.astype(int) - gray.astype(int)).mean() < 4  # the X-ray, through a lossy codec


def test_codestream_sizes_are_read_from_every_kind_of_header():
    """JPEG with other segments before its frame header, JPEG-LS (SOF55), hierarchical JPEG (DHP), JPEG 2000 with
    an image offset, a JP2 file (its codestream's size, not its ihdr box's); a reason where no size can be
    trusted, and "more" where the bytes end before it."""
    from pneumonia_cnn.data.dicom_guard import NEEDS_MORE, codestream_shape
    app0 = b"\xff\xe0\x00\x10" + b"JFIF\0" + bytes(9)
    size = (480).to_bytes(2, "big") + (640).to_bytes(2, "big")

    def frame(marker: int, shape: bytes = size) -> bytes:
        return b"\xff" + bytes([marker]) + b"\x00\x0b\x08" + shape
    assert codestream_shape(b"\xff\xd8" + app0 + frame(0xC0)) == (480, 640)
    assert codestream_shape(b"\xff\xd8\xff\xff" + frame(0xF7)) == (480, 640)  # a fill byte, then JPEG-LS
    assert codestream_shape(b"\xff\xd8" + frame(0xDE)) == (480, 640)
    assert codestream_shape(b"\xff\xd8" + b"\xff\xc4\x00\x04\x00\x00" + frame(0xC2)) == (480, 640)  # DHT first
    siz = b"\xff\x4f\xff\x51\x00\x29\x00\x00" + b"".join(v.to_bytes(4, "big") for v in (700, 500, 100, 20)) + bytes(20)
    assert codestream_shape(siz) == (480, 600)
    jp2 = bytes(4) + b"jP  " + bytes(20) + b"ihdr" + bytes(8) + b"jp2c" + siz  # ihdr says 0x0: the codestream counts
    assert codestream_shape(jp2) == (480, 600)
    assert codestream_shape(b"\xff\xd8" + app0[:6]) == NEEDS_MORE  # the rest is in the next fragment
    assert codestream_shape(b"\xff\xd8" + app0[:6], final=True) == "states no size in its header"
    assert codestream_shape(b"\xff\xd8" + frame(0xC0, bytes(2) + size[2:])) == "states its size only after its header"
    assert codestream_shape(b"\xff\xd8\x00" + frame(0xC0)) == "is corrupt: byte 0x00 at 2 where a JPEG marker belongs"
    assert codestream_shape(b"\xff\xd8\xff\xda\x00\x02" + frame(0xC0)).startswith("states no size before its data")
    assert codestream_shape(b"RLE data") == "is neither JPEG nor JPEG 2000"


def _split_frame_dicom(path, gray, frame: np.ndarray, where: str):
    """A JPEG-baseline DICOM describing ``gray``, its one frame ``frame`` behind 128 KB of comment segments, split
    into two fragments 20 bytes in (``where`` "comment") or 3 bytes into the frame header ("frame header")."""
    encoded = io.BytesIO()
    Image.fromarray(frame).save(encoded, "JPEG", quality=90)
    data = encoded.getvalue()
    comment = b"\xff\xfe" + (65535).to_bytes(2, "big") + bytes(65533)
    data = data[:2] + comment + comment + data[2:]
    cut = 20 if where == "comment" else data.index(b"\xff\xc0") + 3
    write_dicom(path, gray)
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = _two_fragments(data[:cut], data[cut:])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(path, enforce_file_format=True)
    return path


def _two_fragments(first: bytes, rest: bytes) -> bytes:
    """Encapsulated pixel data of one frame in two fragments after an empty offset table (items padded even)."""
    item = b"\xfe\xff\x00\xe0"
    first, rest = first + b"\0" * (len(first) % 2), rest + b"\0" * (len(rest) % 2)
    return (item + bytes(4) + item + len(first).to_bytes(4, "little") + first + item + len(rest).to_bytes(4, "little")
            + rest + b"\xfe\xff\xdd\xe0" + bytes(4))


@pytest.mark.parametrize("where", ["comment", "frame header"])
def test_a_frame_header_past_its_first_fragment_is_read_and_checked(xray, tmp_path, where):
    """A bomb whose frame header sat in its second fragment, or past 128 KB of segments, was decoded unchecked
    (3 GB for 30000x30000); a legitimate file whose fragment boundary fell inside the frame header was refused
    ("compressed frame is 53271x224"). The fragments are joined now: the bomb is refused, the file read."""
    _, gray = xray
    assert read_image(_split_frame_dicom(tmp_path / "honest.dcm", gray, gray, where))[0].shape == (224, 224)
    bomb = _split_frame_dicom(tmp_path / "bomb.dcm", gray, np.zeros((1500, 2500), np.uint8), where)
    with pytest.raises(ImageReadError) as raised:
        read_image(bomb)
    assert raised.value.reason == ("compressed frame is 2500x1500 pixels, but the DICOM header says 224x224 "
                                   "(not decoded)")


def test_a_stray_byte_after_a_jpeg_start_is_refused_before_gdcm_can_abort_the_process(xray, tmp_path):
    """One byte that is no marker right after SOI: Pillow refused the frame, then GDCM's C++ threw "invalid logic
    behavior" and aborted the whole process (SIGABRT), losing every result of the run. Refused first now."""
    path, gray = xray
    bad = write_dicom(tmp_path / "stray.dcm", gray)
    dataset = pydicom.dcmread(bad)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([b"\xff\xd8\x00" + path.read_bytes()[2:]])
    dataset["PixelData"].VR = "OB"
    dataset.save_as(bad, enforce_file_format=True)
    code, out, err = run_cli("predict", "builtin", bad, path, "--engine", "torch")
    assert code == 0 and (f"skipped {bad}: compressed frame is corrupt: byte 0x00 at 2 where a JPEG marker belongs "
                          f"(not decoded)") in err.splitlines(), (code, err)
    assert path.name in out


def test_a_frame_of_many_tiny_fragments_is_parsed_as_its_bytes_double(monkeypatch):
    """Parsed after every fragment, a frame header sought through 130,000 two-byte fragments (SOI, then 256 KB of
    comment segments) was parsed 130,000 times over up to 256 KB each; now each time the bytes read double."""
    from pneumonia_cnn.data import dicom_guard
    calls, parse = [], dicom_guard.codestream_shape

    def counted(head, **keywords):
        calls.append(len(head))
        return parse(head, **keywords)
    monkeypatch.setattr(dicom_guard, "codestream_shape", counted)
    stream = b"\xff\xd8" + (b"\xff\xfe\xff\xff" + bytes(65533)) * 4
    item = b"\xfe\xff\x00\xe0\x02\x00\x00\x00"
    pixel_data = b"\xfe\xff\x00\xe0" + bytes(4) + b"".join(item + stream[at:at + 2] for at in range(0, len(stream), 2))
    assert dicom_guard.compressed_frame_problem(pixel_data, 224, 224) == (
        "compressed frame states no size in its header (not decoded)")
    assert len(calls) <= 20 and max(calls) == len(stream), calls


def test_an_unsigned_32_bit_tiff_is_read_as_unsigned(xray, tmp_path):
    """Pillow reads an unsigned 32-bit TIFF into its signed mode 'I': an X-ray stored at full range (x * 16843009,
    up to 2**32 - 1) wrapped from 2**31 to negative values and scored 0.95 against 0.03 as a JPEG (a probe of the
    server). Read as unsigned, min-max gives back the 8-bit X-ray exactly; a signed TIFF stays signed."""
    import tifffile
    _, gray = xray
    full_range = tmp_path / "u32.tif"
    tifffile.imwrite(full_range, gray.astype(np.uint32) * 16843009)
    assert Image.open(full_range).mode == "I" and gray.max() > 127  # values above 2**31 are there
    low, high = int(gray.min()), int(gray.max())
    expected = np.round((gray.astype(np.float64) - low) * (255 / (high - low))).astype(np.uint8)
    assert np.array_equal(read_image(full_range)[0], expected)
    signed = tmp_path / "i32.tif"
    tifffile.imwrite(signed, gray.astype(np.int32) * 1000 - 200_000)  # SampleFormat 2: negative values are real
    assert np.array_equal(read_image(signed)[0], expected)


def test_a_12_bit_png_is_scaled_by_the_bits_its_values_use(xray, tmp_path):
    """A probe of the OOD flag: 12-bit data in a 16-bit PNG was divided by 257 as if it filled 16 bits: 17 grey
    levels (0-16), children's probabilities moved by up to 0.40 and 15% flagged. Scaled by 4095, an 8-bit X-ray
    stored as 12-bit comes back exactly; full-range 16-bit stays x / 257."""
    _, gray = xray
    assert gray.max() >= 128  # so its 12-bit values reach 2**11: 12 bits used
    twelve = tmp_path / "x12.png"
    Image.fromarray(np.round(gray.astype(np.float64) * 4095 / 255).astype(np.uint16)).save(twelve)
    assert Image.open(twelve).mode == "I;16"
    assert np.array_equal(read_image(twelve)[0], gray)
    sixteen = tmp_path / "x16.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(sixteen)
    assert np.array_equal(read_image(sixteen)[0], gray)
    # a depth, not a stretch: 16-bit data peaking at 32767 or 32768 decode alike (x / 257), as 12-bit data peaking
    # at 2000 or 4000 do (x / 4095 * 255)
    for peak, expected in ((32767, 127), (32768, 128), (2000, 125), (4000, 249)):
        ramp = tmp_path / f"ramp{peak}.png"
        Image.fromarray(np.linspace(0, peak, 64 * 64).round().astype(np.uint16).reshape(64, 64)).save(ramp)
        assert read_image(ramp)[0].max() == expected, peak
