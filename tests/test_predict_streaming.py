"""predict over many files: globs that meet folder links, rows printed as they are scored (Ctrl-C keeps them),
and the streamed output byte for byte what the whole run printed at its end."""
import csv
import glob
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.fileio import display_path, printable
from pneumonia_cnn.inference import Prediction, Predictor
from pneumonia_cnn.inference.files import decode_files
from pneumonia_cnn.predict_io import CSV_FIELDS, collect_paths, columns, expand_glob, format_predictions
from tests.conftest import SHARED_DATA, require_shared


def xray(index: int = 0):
    require_shared()
    return sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[index]


def test_a_glob_does_not_follow_a_link_to_a_parent_folder(tmp_path, capsys, monkeypatch):
    """Python 3.11's ``**`` follows folder links: `loop1/sub/up -> ..` made `loop1/**/*.jpeg` score one file 41
    times."""
    (tmp_path / "loop1" / "sub").mkdir(parents=True)
    shutil.copyfile(xray(), tmp_path / "loop1" / "sub" / "x.jpeg")
    (tmp_path / "loop1" / "sub" / "up").symlink_to("..")
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "loop1/**/*.jpeg", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["path"] for row in rows] == ["loop1/sub/x.jpeg"] and float(rows[0]["probability"]) < 0.5


def test_a_glob_over_two_folder_loops_returns_promptly(tmp_path):
    """Two links up in one folder: the expansion ran for more than ten minutes and took 6 GB."""
    folder = tmp_path / "loop2" / "a" / "b"
    folder.mkdir(parents=True)
    shutil.copyfile(xray(), folder / "x.jpeg")
    (folder / "up").symlink_to("..")
    (folder / "top").symlink_to("../..")
    done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "predict", "loop2/**/*.jpeg", "--format", "csv"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    assert [row["path"] for row in csv.DictReader(io.StringIO(done.stdout))] == ["loop2/a/b/x.jpeg"]


def test_a_glob_without_links_matches_what_glob_matches(tmp_path, monkeypatch):
    """The walk that replaced glob's ``**`` finds the same files: hidden ones skipped, a trailing ``**``, a
    pattern relative to the working folder or from ``./``, two ``**``."""
    for name in ("a/x.jpeg", "a/sub/y.jpeg", "a/sub/deeper/z.png", "a/.hidden/h.jpeg", "a/.h.jpeg", "b/w.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(xray(), tmp_path / name)
    (tmp_path / "a" / "link.jpeg").symlink_to("x.jpeg")  # a link to a file is still listed, as a folder lists it
    monkeypatch.chdir(tmp_path)
    for pattern in ("a/**", "a/**/*.jpeg", "**/*.jpeg", "./a/**/*.jpeg", "*/**/*.png", "a/**/sub/*", "a/**/**/*.jpeg",
                    f"{tmp_path}/**/*.jpeg", "a/*.jpeg", "nowhere/**/*.jpeg"):
        files = sorted({match for match in glob.glob(pattern, recursive=True) if (tmp_path / match).is_file()})
        assert [match for match in expand_glob(pattern) if (tmp_path / match).is_file()] == files, pattern


def test_rows_are_printed_as_they_are_scored_and_kept_on_ctrl_c():
    """Rows were printed only once every image was scored (750 MB for the 4,137 train images): Ctrl-C printed
    nothing. Now each chunk's rows come as it is scored, and an interrupt keeps whole lines, exit 130."""
    require_shared()
    folder = SHARED_DATA / "train"
    process = subprocess.Popen([sys.executable, "-m", "pneumonia_cnn", "predict", str(folder), "--format", "csv"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)  # unbuffered:
    try:  # communicate reads the pipe itself, and would miss what a buffered readline had read ahead
        shown = process.stdout.readline() + process.stdout.readline()  # the head, then the first row
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in stderr.decode(), stderr.decode()
    text = (shown + rest).decode()
    assert text.endswith("\r\n")  # whole lines only
    rows = list(csv.reader(io.StringIO(text, newline="")))[1:]
    paths, _ = collect_paths([str(folder)])
    assert 1 <= len(rows) < len(paths) and all(len(row) == len(CSV_FIELDS) for row in rows)
    # the very lines a whole run gives those files
    assert text == format_predictions(Predictor("builtin").predict_files(paths[:len(rows)]), "csv") + "\n"


SHOW_ROUNDS = '''
import sys
from pneumonia_cnn.cli.deployment import show
rows = "".join(f"row {n:03d} " + "x" * 300 + "\\r\\n" for n in range(256))
for round in range(int(sys.argv[1])):
    try:
        show(f"start {round}\\n" + rows + f"end {round}", False)
    except KeyboardInterrupt:  # acted on once the text is written
        pass
'''


def test_a_ctrl_c_while_a_full_pipe_blocks_the_rows_loses_none_of_them():
    """With the pipe full (the reader slower than the scoring), a Ctrl-C interrupted the write of a chunk's rows:
    CPython's buffered writer dropped the rest of it, then the newline came ('...166b31,\\n', cut at 64 KiB).
    Each round here blocks an 80 KB text on the full pipe and interrupts it: every row arrives."""
    rounds = 12
    child = subprocess.Popen([sys.executable, "-c", SHOW_ROUNDS, str(rounds)], stdout=subprocess.PIPE, bufsize=0)
    reader = io.BufferedReader(child.stdout)
    try:
        for round in range(rounds):
            assert reader.readline() == f"start {round}\n".encode()
            time.sleep(0.2)  # the child is now blocked writing into the full pipe
            child.send_signal(signal.SIGINT)
            lines = []
            while not (line := reader.readline()).startswith(b"end") and line:
                lines.append(line)
            assert line == f"end {round}\n".encode() and len(lines) == 256, (round, lines[-1:], line)
            assert all(re.fullmatch(rb"row \d{3} x{300}\r\n", line) for line in lines)
    finally:
        child.kill()
        child.wait()


def mixed_folder(tmp_path):
    """Good X-rays of both classes, a broken and an empty file, names a CSV quotes and a table cuts or widens."""
    require_shared()
    folder = tmp_path / "mixed"
    for name in ("NORMAL", "PNEUMONIA"):
        (folder / name).mkdir(parents=True)
        for source in sorted((SHARED_DATA / "test" / name).iterdir())[:6]:
            shutil.copyfile(source, folder / name / source.name)
    (folder / "NORMAL" / "IM-0001-broken.jpeg").write_bytes(b"garbage")
    (folder / "PNEUMONIA" / "empty.png").write_bytes(b"")
    shutil.copyfile(xray(), folder / 'a, "quoted" name, longer than the seventy columns the table gives a path.jpeg')
    shutil.copyfile(xray(1), folder / "肺炎の画像.jpeg")
    return folder


def whole_run(items, fmt: str, batch_size: int) -> str:
    """What predict printed before it streamed: every image decoded, scored in one call, then formatted at once
    (the CSV and the table as the one-shot formatter wrote them)."""
    paths, missing = collect_paths(items)
    predictor = Predictor("builtin")
    decoded = [item for chunk in decode_files(paths, predictor.bundle.preprocessing, batch_size) for item in chunk]
    good = [item for item in decoded if item.pixels is not None]
    entries, _ = predictor.assess(np.stack([item.pixels for item in good]), [item.meta for item in good], batch_size)
    entries = iter(entries)
    predictions = [Prediction(item.path, model=predictor.model_id, **next(entries)) if item.pixels is not None
                   else Prediction(item.path, error=item.error, model=predictor.model_id) for item in decoded]
    predictions += [Prediction(entry, error="no such file or folder", model=predictor.model_id) for entry in missing]
    if fmt in ("json", "fhir"):
        return format_predictions(predictions, fmt) + "\n"
    rows = [dict(p.to_dict(), path=display_path(p.path)) for p in predictions]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS,
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(dict(row, warnings="; ".join(row["warnings"])) for row in rows)
        return buffer.getvalue().rstrip("\n") + "\n"
    from pneumonia_cnn.predict_io import TABLE_PATH_COLUMNS, _fit
    width = min(max([columns(printable(row["path"])) for row in rows] + [4]), TABLE_PATH_COLUMNS)
    lines = [f"{'path':<{width}}  {'probability':>11}  {'label':<10} {'in-dist':<8} note"]
    for row in rows:
        path = _fit(printable(row["path"]), width)
        flag = {True: "yes", False: "NO", None: "?"}[row["in_distribution"]]
        lines.append(f"{path}  {'-':>11}  {'-':<10} {'-':<8} unreadable: {row['error']}" if row["error"] else
                     f"{path}  {row['probability']:>11.4f}  {row['label']:<10} {flag:<8} " + "; ".join(row["warnings"]))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("fmt", ["csv", "table", "json", "fhir"])
def test_the_streamed_output_is_byte_for_byte_the_whole_runs(fmt, tmp_path, capsys, monkeypatch):
    """Chunks of 5 files scored 3 at a time (a broken file inside a chunk; the missing path's row last, as
    before): the same bytes as the run that scored every image at once and printed at its end."""
    import pneumonia_cnn.inference.predictor as predictor_module
    monkeypatch.setattr(predictor_module, "STREAM_CHUNK", 5)
    items = [str(mixed_folder(tmp_path)), str(tmp_path / "nowhere.jpeg")]
    assert main(["predict", *items, "--format", fmt, "--batch-size", "3"]) == 0
    out, expected = capsys.readouterr().out, whole_run(items, fmt, 3)
    if fmt == "fhir":  # the report's time of issue is the only difference between two runs
        out, expected = (re.sub(r'"issued": "[^"]+"', '"issued": ""', text) for text in (out, expected))
    assert out == expected
    if fmt == "json":
        rows = json.loads(out)
        assert len(rows) == 17 and rows[-1]["path"].endswith("nowhere.jpeg")
        assert sum(row["error"] is not None for row in rows) == 3


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_a_missing_name_keeps_its_place_among_the_rows(fmt, tmp_path, capsys, monkeypatch):
    """The rows of missing names had all come last: a join by position against the names given went wrong.
    Chunks of 2 put missing names at a chunk's start, inside one and after the last file."""
    import pneumonia_cnn.inference.predictor as predictor_module
    monkeypatch.setattr(predictor_module, "STREAM_CHUNK", 2)
    items = [str(tmp_path / "gone.jpeg"), str(xray(0)), str(xray(1)), str(tmp_path / "zz*.png"), str(xray(2)),
             str(tmp_path / "also gone.png"), str(tmp_path / "last gone.dcm")]
    assert main(["predict", *items, "--format", fmt]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out) if fmt == "json" else list(csv.DictReader(io.StringIO(out)))
    assert [row["path"] for row in rows] == items
    assert [bool(row["error"]) for row in rows] == [True, False, False, True, False, True, True]


def test_long_paths_that_differ_early_are_shown_whole_in_the_table(tmp_path, capsys, monkeypatch):
    """The table cut a path to its last 69 columns: two DICOM exports' files named by the same UIDs under two
    patients' folders showed on identical rows, one NORMAL and one PNEUMONIA."""
    require_shared()
    uids = ("1.2.840.113619.2.55.3.604688119.868.1249343483.504/1.2.840.113619.2.55.3.604688119.868.1249343483.505/"
            "1.2.840.113619.2.55.3.604688119.868.1249343483.506")
    for patient, source in (("PAT001", xray(0)), ("PAT002", sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[0])):
        (tmp_path / patient / uids).mkdir(parents=True)
        shutil.copyfile(source, tmp_path / patient / uids / "IM-0001.jpeg")
    shutil.copyfile(xray(1), tmp_path / "short.jpeg")
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "PAT001", "PAT002", "short.jpeg"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines[1:3]] == [f"PAT001/{uids}/IM-0001.jpeg",
                                                           f"PAT002/{uids}/IM-0001.jpeg"]
    assert lines[3].startswith("short.jpeg" + " " * 110 + "  ")
    assert lines[0].startswith("path" + " " * 116 + "  probability")  # the column stays 120 wide
    assert [line.split()[2] for line in lines[1:]] == ["NORMAL", "PNEUMONIA", "NORMAL"]


def test_a_csv_cell_a_spreadsheet_would_run_as_a_formula_is_quoted(tmp_path, capsys, monkeypatch):
    """A file named `=1+2.jpeg` or `+cmd.jpeg` began its CSV row unquoted: Excel and LibreOffice run it."""
    require_shared()
    names = ["=1+2.jpeg", "+cmd.jpeg", "@x.jpeg", "-x.jpeg", "'q.jpeg", "plain.jpeg"]
    for name in names:
        shutil.copyfile(xray(), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", *(f"./{name}" for name in names), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["path"] for row in rows] == ["'=1+2.jpeg", "'+cmd.jpeg", "'@x.jpeg", "'-x.jpeg", "''q.jpeg",
                                            "plain.jpeg"]
    assert len({row["probability"] for row in rows}) == 1  # the same image under each name
    # a class named by its folder is a cell too
    text = format_predictions([Prediction("x.jpeg", 0.9, "=SUM(A1)", 0.5, True, 1.0, [])], "csv")
    assert text.splitlines()[1].startswith("x.jpeg,0.9,'=SUM(A1),0.5,")
