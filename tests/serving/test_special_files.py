"""Files the server reads at start that are no regular files: a named pipe as --api-keys or --ssl-certfile
waited for a writer for ever, /dev/full as a key file was read until the memory ran out (24 GB), and a file or
/proc in place of --keep-images let the server start, then withheld every prediction."""
import os
import threading

import pytest

from pneumonia_cnn.errors import PneumoniaCNNError


def finished_within(seconds, action, unblock):
    """What ``action`` raised, run in a thread; ``unblock`` frees a thread stuck on a pipe if it did not finish."""
    raised = []

    def run():
        try:
            action()
        except BaseException as error:  # noqa: BLE001 - the test asserts which
            raised.append(error)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        unblock()
        thread.join(10)
        pytest.fail("blocked on a named pipe")
    return raised[0] if raised else None


def writer_for(fifo):
    def unblock():
        descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(descriptor)
    return unblock


def test_key_files_that_are_pipes_devices_or_huge_are_refused(tmp_path):
    from pneumonia_cnn.serving.auth import add_key, read_key_file
    fifo = tmp_path / "keys.fifo"
    os.mkfifo(fifo)
    error = finished_within(10, lambda: read_key_file(fifo), writer_for(fifo))
    assert str(error) == f"--api-keys {fifo}: not a key file (not a regular file: a named pipe (FIFO))"
    with pytest.raises(PneumoniaCNNError, match=r"^--api-keys /dev/full: not a key file \(not a regular file: "
                                                r"a device\)$"):
        add_key("/dev/full", "a")
    huge = tmp_path / "keys.txt"
    with open(huge, "wb") as handle:
        handle.truncate(17 * 2**20)  # sparse: no disk used
    with pytest.raises(PneumoniaCNNError, match=r"^--api-keys .*keys.txt: not a key file \(17 MB; a key file "
                                                r"holds one short line per key\)$"):
        read_key_file(huge)


def test_tls_files_that_are_pipes_are_refused_by_serve_and_listen(tmp_path):
    from pneumonia_cnn.interop.dicom_access import NodeAccess
    from pneumonia_cnn.serving.app import check_tls_files
    fifo = tmp_path / "cert.fifo"
    os.mkfifo(fifo)
    error = finished_within(10, lambda: check_tls_files(str(fifo), str(fifo)), writer_for(fifo))
    assert str(error) == f"--ssl-certfile {fifo}: not a regular file (a named pipe (FIFO))"
    error = finished_within(10, lambda: NodeAccess(tls_cert=str(fifo), tls_key=str(fifo)).server_context(),
                            writer_for(fifo))
    assert str(error).startswith(f"--tls-cert/--tls-key {fifo} / {fifo}: not a regular file ({fifo}: a named pipe")


def test_keep_images_that_is_not_a_usable_folder_is_refused_at_start(tmp_path):
    from pneumonia_cnn.serving.audit import AuditLog
    a_file = tmp_path / "image.jpeg"
    a_file.write_bytes(b"x")
    for keep, reason in ((a_file, "not a folder"), ("/proc/keep", "cannot keep images there (No such file or "
                                                                 "directory)")):
        with pytest.raises(PneumoniaCNNError) as refused:
            AuditLog(tmp_path / "audit.sqlite", keep)
        assert str(refused.value) == f"--keep-images {keep}: {reason}"
    assert a_file.read_bytes() == b"x" and not (tmp_path / "audit.sqlite").exists()
    log = AuditLog(tmp_path / "audit.sqlite", tmp_path / "kept")  # a new folder is made
    log.close()
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []
