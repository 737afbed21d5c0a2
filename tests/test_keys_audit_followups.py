"""Follow-ups on api-key and audit: ``--revoke`` through a symlinked key file replaced the link with a new file and
left the target (which a server may read) with the revoked key; adding a key to an existing 0644 file left it
0644; ``audit --since ''`` (an unset $SINCE) exported every row; and ``--since`` after ``--until`` printed the CSV
header alone, exit 0, without a word."""
import os
import stat

import pytest

from pneumonia_cnn.serving.audit import connect
from tests.test_cli_guards import run


def key_ids(path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def test_revoke_through_a_link_rewrites_its_target_and_keeps_the_link(capsys, tmp_path):
    real, link = tmp_path / "real.txt", tmp_path / "link.txt"
    for key_id in ("ward3", "ops"):
        assert run(capsys, "api-key", real, "--id", key_id)[0] == 0
    link.symlink_to("real.txt")
    assert run(capsys, "api-key", link, "--id", "ward3", "--revoke")[0] == 0
    assert link.is_symlink() and os.readlink(link) == "real.txt"
    assert key_ids(real) == ["ops"]
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "real.txt"]  # no temporary file left
    assert run(capsys, "api-key", link, "--id", "ward4")[0] == 0  # adding follows the link too
    assert key_ids(real) == ["ops", "ward4"] and link.is_symlink()


def test_adding_a_key_to_a_0644_file_leaves_it_0600_and_says_so(capsys, caplog, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("")
    keys.chmod(0o644)
    assert run(capsys, "api-key", keys, "--id", "ward3")[0] == 0
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [f"{keys}: mode 0644 set to 0600 (a key file is its owner's alone)"]
    assert key_ids(keys) == ["ward3"]
    caplog.clear()
    assert run(capsys, "api-key", keys, "--id", "ops")[0] == 0  # already 0600: nothing said
    assert not [r for r in caplog.records if r.levelname == "WARNING"] and key_ids(keys) == ["ward3", "ops"]


@pytest.mark.parametrize("flag", ["--since", "--until"])
@pytest.mark.parametrize("value", ["", "  "])
def test_audit_refuses_an_empty_bound(capsys, tmp_path, flag, value):
    log = tmp_path / "audit.sqlite"
    connect(log).close()
    assert run(capsys, "audit", log, flag, value) == (2, f"error: {flag}: empty; give a date/time or a span")
    assert capsys.readouterr().out == ""


def test_audit_refuses_since_after_until(capsys, tmp_path):
    log = tmp_path / "audit.sqlite"
    connect(log).close()
    status, error = run(capsys, "audit", log, "--since", "1d", "--until", "7d")
    assert status == 2 and error.startswith("error: --since 1d (") and " is after --until 7d (" in error
    assert error.endswith("no row lies between them") and "\n" not in error
    status, error = run(capsys, "audit", log, "--since", "2026-05-02", "--until", "2026-05-02T00:00Z")
    assert status == 2 and "is the same moment as --until 2026-05-02T00:00Z" in error
    assert run(capsys, "audit", log, "--since", "7d", "--until", "1d")[0] == 0  # the right way round
