"""What a probe found: ``adapt --labelled`` with 4 images per class of 2 patients ended "min() arg is an empty
sequence" after AdaBN; a key line with scrypt settings hashlib refuses was accepted, then every request with its
id got a 500 (and told the id exists); audit and api-key named the wrong reason or option, or none; audit of a
log copied with its -wal but not its -shm left a -shm beside it; and adapt said nothing when its detector was
refitted on so few images that it flags far fewer adult X-rays."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from urllib.parse import quote

import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.errors import PneumoniaCNNError
from tests.conftest import PROJECT, SHARED_DATA, require_shared
from tests.test_cli_guards import run

TEST = SHARED_DATA / "test"



def probe_labelled(folder, patients: int):
    """As the probe built it: 4 images per class, of ``patients`` patients each (the id is in the file name)."""
    for name, stem in (("NORMAL", "IM-08{}0-000{}.jpeg"), ("PNEUMONIA", "person88{}_bacteria_{}.jpeg")):
        (folder / name).mkdir(parents=True)
        for i, path in enumerate(sorted((TEST / name).iterdir())[49:53]):
            shutil.copy(path, folder / name / stem.format(i % patients, i))
    return folder


def site40(folder):
    """The probe's site: the 100th to 139th of the test images, by path."""
    folder.mkdir()
    for path in sorted(TEST.glob("*/*.jpeg"))[99:139]:
        (folder / path.name).symlink_to(path)
    return folder


# ---------- 1. labelled images of too few patients: refused before any image is decoded

@pytest.mark.parametrize("patients", [1, 2, 3])
def test_adapt_refuses_labelled_images_of_too_few_patients_before_any_work(capsys, tmp_path, monkeypatch, patients):
    require_shared()
    from pneumonia_cnn import adaptation
    labelled, site = probe_labelled(tmp_path / "L", patients), site40(tmp_path / "s40")

    def decoded(*args, **kwargs):
        raise AssertionError("images decoded before the refusal")
    monkeypatch.setattr(adaptation, "build_or_load", decoded)
    status, error = run(capsys, "adapt", "builtin", "--data", site, "--labelled", labelled, "--out", tmp_path / "x.pt")
    assert (status, error) == (2, f"error: {labelled}: need at least 4 patients per class (NORMAL {patients}, "
                                  f"PNEUMONIA {patients}): 2 are kept out to judge the adapted model, the rest "
                                  f"fine-tune it (a patient is read from the file name: person123_..., IM-0115-...; "
                                  f"otherwise each image is one)")
    assert not (tmp_path / "x.pt").exists()


def test_four_patients_per_class_pass_and_leave_two_of_each_to_fine_tune_on(tmp_path):
    require_shared()
    from pneumonia_cnn.adaptation import _held_out_split
    from pneumonia_cnn.data.dataset import load_split
    from pneumonia_cnn.data.site_checks import check_labelled_site, fewest_patients
    labelled = probe_labelled(tmp_path / "L", 4)
    site = load_split(labelled, None)
    check_labelled_site(site, labelled, 0.35)
    held = _held_out_split(site.labels, site.patients, 0.35, 0)
    for label in (0, 1):
        assert len({p for p, y, h in zip(site.patients, site.labels, held) if y == label and h}) == 2
        assert len({p for p, y, h in zip(site.patients, site.labels, held) if y == label and not h}) == 2
    assert [fewest_patients(fraction) for fraction in (0.35, 0.7)] == [4, 6]


# ---------- 2. key lines whose scrypt settings hashlib refuses: refused when the file is read

def bad_lines():
    huge = 2**20
    return [("scrypt$3$8$1$AAAA$AAAA", "n=3 is not a power of 2 above 1"),
            (f"scrypt${huge}$8$1$AAAA$AAAA", f"n={huge}, r=8, p=1 need 1,073,744,896 bytes per check, more than the "
                                             f"67,108,864 allowed"),
            ("scrypt$16384$0$1$AAAA$AAAA", "r=0, p=1: each must be 1 or more"),
            ("scrypt$16384$-8$1$AAAA$AAAA", "r=-8, p=1: each must be 1 or more"),
            ("scrypt$65536$1$1$AAAA$AAAA", "n=65536 is too large for r=1 (scrypt needs n below 2**16)"),
            ("scrypt$16384$8$1000$AAAA$AAAA", "n=16384, r=8, p=1000 ask 1000 times the work of api-key's settings, "
                                              "more than the 16 allowed")]


@pytest.mark.parametrize("hashed, reason", bad_lines())
def test_a_key_line_with_unusable_scrypt_settings_is_refused_where_the_file_is_read(capsys, tmp_path, hashed, reason):
    from pneumonia_cnn.serving.auth import KeyRing, add_key, read_key_file, revoke_key
    keys = tmp_path / "keys.txt"
    add_key(keys, "good")
    with open(keys, "a") as handle:
        handle.write(f"bad predict {hashed}\n")
    before = keys.read_bytes()
    said = (f"{keys}:2: key bad has unusable scrypt settings ({reason}); revoke it (pneumonia-cnn api-key {keys} "
            f"--id bad --revoke) and add a new one")
    for read in (read_key_file, KeyRing.from_file):  # serve's start and its reload
        with pytest.raises(PneumoniaCNNError) as refused:
            read(keys)
        assert str(refused.value) == said
    assert run(capsys, "api-key", keys, "--id", "w") == (2, f"error: {said}")
    assert keys.read_bytes() == before
    revoke_key(keys, "bad")  # the way out the refusal names
    assert list(read_key_file(keys)) == ["good"]


def test_the_scrypt_bounds_are_hashlibs_and_api_keys_settings_pass():
    from pneumonia_cnn.serving.auth import SCRYPT, derive, scrypt_problem
    assert scrypt_problem(**SCRYPT) is None
    for n, r, p in ((2**15, 8, 1), (2**15, 1, 1), (2, 1, 1), (2**14, 8, 16)):  # accepted: hashlib runs them
        assert scrypt_problem(n, r, p) is None
        assert len(derive("x", b"salt", n, r, p)) == 32
    for n, r, p in ((2**16, 8, 1), (2**16, 1, 1), (2, 8, 65533), (3, 8, 1), (2**14, 0, 1)):  # hashlib refuses them
        assert scrypt_problem(n, r, p)
        with pytest.raises(ValueError):
            derive("x", b"salt", n, r, p)


def test_serve_refuses_a_key_file_with_an_unusable_line_at_start(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("bad predict scrypt$3$8$1$AAAA$AAAA\n")
    done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "serve", "builtin", "--port", "18731", "--api-keys",
                           str(keys)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(PROJECT / "src")))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {keys}:1: key bad has unusable scrypt settings (n=3 is not a power of 2 above 1); revoke it "
        f"(pneumonia-cnn api-key {keys} --id bad --revoke) and add a new one")
    assert "Traceback" not in done.stderr


# ---------- 3. the file and the reason, in one plain line

def test_audit_and_api_key_name_the_file_and_the_reason(capsys, tmp_path):
    fifo, folder = tmp_path / "log.fifo", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    assert run(capsys, "audit", fifo) == (2, f"error: {fifo}: not an audit log (not a regular file: a named pipe "
                                             f"(FIFO))")
    assert run(capsys, "audit", folder) == (2, f"error: {folder}: not an audit log (not a regular file: a folder)")
    assert run(capsys, "audit", tmp_path / "none.sqlite") == (2, f"error: {tmp_path / 'none.sqlite'}: no such "
                                                                 f"audit log")
    for extra in ((), ("--revoke",)):  # api-key has no --api-keys option
        assert run(capsys, "api-key", folder, "--id", "w", *extra) == (
            2, f"error: {folder}: not a key file (not a regular file: a folder)")
    nowhere = tmp_path / "nodir" / "k.txt"
    assert run(capsys, "api-key", nowhere, "--id", "w") == (
        2, f"error: {nowhere}: cannot write the key file (no folder {nowhere.parent})")
    assert not nowhere.parent.exists()


# ---------- 4. a log copied with its -wal but not its -shm: the -wal's rows, and nothing created beside it

def test_audit_of_a_log_with_its_wal_but_no_shm_reads_every_row_and_creates_nothing(capsys, tmp_path):
    from pneumonia_cnn.serving.audit import AuditLog
    from tests.serving.test_audit_edges import row, snapshot, write_rows
    live, copy = tmp_path / "live", tmp_path / "copy"
    live.mkdir(), copy.mkdir()
    log = AuditLog(live / "audit.sqlite")
    try:
        write_rows(log, [row("r1", "[]"), row("r2", "[]")])  # committed, still in the -wal file
        for suffix in ("", "-wal"):  # a backup of the two, without the -shm
            shutil.copyfile(f"{live / 'audit.sqlite'}{suffix}", f"{copy / 'audit.sqlite'}{suffix}")
    finally:
        log.close()
    plain = sqlite3.connect(f"file:{quote(str(copy / 'audit.sqlite'))}?immutable=1", uri=True)
    try:  # immutable=1 reads the file alone: the table and its rows are still in the -wal
        assert plain.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == []
    finally:
        plain.close()
    before = snapshot(copy)
    assert main(["audit", str(copy / "audit.sqlite"), "--format", "json"]) == 0
    assert [r["request_id"] for r in json.loads(capsys.readouterr().out)] == ["r1", "r2"]
    assert snapshot(copy) == before  # no -shm; the log and its -wal not changed, nor their time stamps


# ---------- 5. a detector refitted on few of the site's images: said, without figures

def test_adapt_warns_when_the_detector_was_refitted_on_few_images(capsys, tmp_path):
    require_shared()
    from pneumonia_cnn.adaptation import ood_fit_record
    from pneumonia_cnn.data.site_checks import FEW_OOD_REFIT_IMAGES, few_images_warning
    warning = (f"warning: the out-of-distribution detector was refitted on only 40 of the site's images (fewer than "
               f"{FEW_OOD_REFIT_IMAGES}); refitted on so few it can flag far fewer X-rays from outside the intended "
               f"population (adults, for one) than the source checkpoint's: adapt on at least {FEW_OOD_REFIT_IMAGES} "
               f"of the site's images before relying on its flag")
    assert main(["adapt", "builtin", "--data", str(site40(tmp_path / "s40")), "--out", str(tmp_path / "a.pt")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == warning
    assert "%" not in warning
    assert few_images_warning({"ood_fitted_on": ood_fit_record(FEW_OOD_REFIT_IMAGES - 10, 9)}) is not None
    assert few_images_warning({"ood_fitted_on": ood_fit_record(FEW_OOD_REFIT_IMAGES - 10, 10)}) is None
