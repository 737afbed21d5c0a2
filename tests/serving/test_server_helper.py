"""The test servers' own helper: a port another process took between the probe and the bind is not a failure of
the test (a full run once lost two tests to an Orthanc whose ports collided)."""
import socket

import tests.serving.conftest as serving


def test_a_server_whose_port_was_taken_starts_again_on_another(tmp_path, monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    handed_out, free_port = [], serving.free_port

    def first_one_taken() -> int:
        handed_out.append(taken.getsockname()[1] if not handed_out else free_port())
        return handed_out[-1]
    monkeypatch.setattr(serving, "free_port", first_one_taken)
    server = serving.Server("builtin", workdir=tmp_path)
    try:
        assert server.port != taken.getsockname()[1] and len(handed_out) == 2
        assert "Address already in use" in (tmp_path / f"server-{taken.getsockname()[1]}.log").read_text()
    finally:
        server.stop()
        taken.close()
