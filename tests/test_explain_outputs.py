"""Found by a hostile probe of ``explain`` (2026-11-27): file names printed raw (a newline forged a result line,
an escape sequence reached the terminal, a non-UTF-8 name ended the command), one overlay that could not be
written ended the whole command naming a temporary file, ``--out /proc/self`` failed only after the scoring,
overlays written into the folder of an image read, another image's overlay of the same name silently replaced,
and nothing printed until the end (Ctrl-C after 7 maps showed none of them). Real X-rays, the built-in model."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import SHARED_DATA, require_shared
from tests.test_cli_guards import digest, run


@pytest.fixture()
def xrays():
    require_shared()
    return [*sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:3],
            *sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[:3]]


def cli(*argv, **options):
    environment = dict(os.environ, PYTHONIOENCODING="utf-8")  # strict UTF-8, as a terminal or a pipe may be
    return subprocess.run([sys.executable, "-m", "pneumonia_cnn", *map(str, argv)], capture_output=True,
                          env=environment, timeout=300, **options)


def test_explain_prints_file_names_escaped_as_predict_does(tmp_path, xrays):
    names = tmp_path / "names"
    names.mkdir()
    shutil.copyfile(xrays[0], names / "x: p=0.0100 NORMAL -> fake.png (layer layer4)\ny.jpeg")
    shutil.copyfile(xrays[0], names / "esc\x1b[31mRED.jpeg")
    shutil.copyfile(xrays[0], os.fsencode(names) + b"/bad\xff.jpeg")
    done = cli("explain", names, "--out", tmp_path / "maps")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{names}/") for line in lines)  # one line per image, none forged
    assert b"\x1b" not in done.stdout
    assert any(line.startswith(f"{names}/bad\\xff.jpeg: p=") and "bad\\xff_gradcam.png" in line for line in lines)
    assert any(line.startswith(f"{names}/esc\\x1b[31mRED.jpeg: p=") for line in lines)
    assert any(line.startswith(f"{names}/x: p=0.0100 NORMAL -> fake.png (layer layer4)\\ny.jpeg: p=")
               for line in lines)
    assert len(os.listdir(tmp_path / "maps")) == 6


def test_an_overlay_that_cannot_be_written_costs_only_its_image(capsys, caplog, tmp_path, xrays):
    images = tmp_path / "in"
    images.mkdir()
    shutil.copyfile(xrays[0], images / "a.jpeg")
    long_name = "L" * 245 + ".jpeg"  # a legal name; its overlay's, 257 characters, is not
    shutil.copyfile(xrays[1], images / long_name)
    shutil.copyfile(xrays[2], images / "z.jpeg")
    assert run(capsys, "explain", images, "--out", tmp_path / "maps")[0] == 0
    assert caplog.messages == [f"skipped {images / long_name}: overlay not written: {tmp_path / 'maps' / ('L' * 245)}"
                     f"_gradcam.png (File name too long)"]
    assert sorted(os.listdir(tmp_path / "maps")) == ["a_gradcam.npy", "a_gradcam.png", "z_gradcam.npy",
                                                     "z_gradcam.png"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_an_out_folder_that_takes_no_file_is_refused_before_the_scoring(capsys, xrays):
    status, error = run(capsys, "explain", xrays[0], "--out", "/proc/self")
    assert status == 2 and error.startswith("error: /proc/self: cannot write in this folder (")


def test_no_overlay_goes_beside_an_image_read_or_into_a_folder_given(capsys, tmp_path, xrays):
    """Beside an image, or anywhere in a folder given (read whole), the overlays would be read as X-rays by the
    next predict of that folder. A subfolder of an image's own folder is allowed (the README's `explain
    chest.jpeg --out maps/`): refusing it made an image in /tmp rule out every --out under /tmp."""
    tree = tmp_path / "in" / "tree"
    tree.mkdir(parents=True)
    shutil.copyfile(xrays[0], tmp_path / "in" / "good.jpeg")
    shutil.copyfile(xrays[1], tree / "a.jpeg")
    status, error = run(capsys, "explain", tmp_path / "in" / "good.jpeg", tree / "a.jpeg", "--out", tree)
    assert (status, error) == (2, f"error: {tree}: --out is among the images explain reads ({tree}); give a folder "
                                  f"outside it")
    status, error = run(capsys, "explain", tmp_path / "in", "--out", tree / "sub")
    assert (status, error) == (2, f"error: {tree / 'sub'}: --out is among the images explain reads "
                                  f"({tmp_path / 'in'}); give a folder outside it")
    assert not (tree / "sub").exists()
    assert run(capsys, "explain", tmp_path / "in" / "good.jpeg", "--out", tmp_path / "in" / "maps")[0] == 0
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    status, error = run(capsys, "explain", tmp_path / "bad.pt", tree / "a.jpeg", "--out", tmp_path / "made")
    assert status == 2 and "not a readable checkpoint" in error
    assert not (tmp_path / "made").exists()  # a model that does not load leaves no folder behind


def test_another_images_overlay_of_the_same_name_is_kept(capsys, tmp_path, xrays):
    for folder, source in (("a", xrays[0]), ("b", xrays[4])):
        (tmp_path / folder).mkdir()
        shutil.copyfile(source, tmp_path / folder / "x.jpeg")
    maps = tmp_path / "maps"
    assert run(capsys, "explain", tmp_path / "a" / "x.jpeg", "--out", maps)[0] == 0
    before = {name: digest(maps / name) for name in ("x_gradcam.png", "x_gradcam.npy")}
    status, error = run(capsys, "explain", tmp_path / "b" / "x.jpeg", "--out", maps)
    assert (status, error) == (2, f"error: {maps / 'x_gradcam.png'}: holds the overlay of another image; the overlay "
                                  f"of {tmp_path / 'b' / 'x.jpeg'} would replace it; give another --out, or remove it")
    assert {name: digest(maps / name) for name in before} == before
    from pneumonia_cnn.data.fingerprint import file_fingerprint
    from pneumonia_cnn.explanation import overlay_source
    recorded = overlay_source(maps / "x_gradcam.png")  # what it was made of: its content, not its path (a patient's
    assert recorded == file_fingerprint(tmp_path / "a" / "x.jpeg")  # name may be in the path)
    assert str(tmp_path).encode() not in (maps / "x_gradcam.png").read_bytes()
    assert run(capsys, "explain", tmp_path / "a" / "x.jpeg", "--out", maps)[0] == 0  # its own: made again
    (tmp_path / "a").rename(tmp_path / "moved")  # and from a moved folder: the same image
    assert run(capsys, "explain", tmp_path / "moved" / "x.jpeg", "--out", maps)[0] == 0
    (tmp_path / "moved").rename(tmp_path / "a")
    (maps / "y_gradcam.png").write_bytes(b"not ours")  # a file explain did not write is kept too
    shutil.copyfile(xrays[1], tmp_path / "a" / "y.jpeg")
    status, error = run(capsys, "explain", tmp_path / "a" / "y.jpeg", "--out", maps)
    assert status == 2 and "y_gradcam.png: holds a file this version of explain did not write (an earlier " in error
    assert (maps / "y_gradcam.png").read_bytes() == b"not ours"
    (maps / "z_gradcam.png").mkdir()  # a folder there is named a folder (it read "holds a file ... did not write")
    shutil.copyfile(xrays[1], tmp_path / "a" / "z.jpeg")
    assert run(capsys, "explain", tmp_path / "a" / "z.jpeg", "--out", maps) == (
        2, f"error: {maps / 'z_gradcam.png'}: is a folder; the overlay of {tmp_path / 'a' / 'z.jpeg'} would replace "
           f"it; give another --out, or remove it")


def test_each_result_is_printed_as_its_image_is_done(tmp_path):
    require_shared()
    images = tmp_path / "in"
    images.mkdir()
    sources = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:120]  # ~50 ms each: seconds of work left
    for source in sources:
        shutil.copyfile(source, images / source.name)
    maps = tmp_path / "maps"
    process = subprocess.Popen([sys.executable, "-m", "pneumonia_cnn", "explain", str(images), "--out", str(maps)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        written = len(list(maps.glob("*_gradcam.png")))
        assert first and written < len(sources)  # shown while the others were still to do
        process.send_signal(signal.SIGINT)  # at once, mid-run on any device (after a second, 40 images had left it
        # ending as the signal came, outside every handler)
        rest, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    shown = [line.split(" -> ")[1].split(" (layer")[0] for line in [first, *rest.splitlines()] if " -> " in line]
    assert 1 <= len(shown) < len(sources) and all(os.path.isfile(path) for path in shown)
    assert len(shown) >= len(list(maps.glob("*_gradcam.png"))) - 1  # what was done was shown (one may be mid-print)
