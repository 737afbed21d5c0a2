"""Who may send to ``listen``: the calling AE titles of ``--accept-from``, the node's own called AE title, and
DICOM TLS with certificates for the images received (``--tls-cert/--tls-key/--tls-ca``) and the reports sent
(``--send-tls-ca``). Real associations on loopback; certificates made with openssl (tests/interop/tls.py)."""
from __future__ import annotations

import logging
import ssl
import time

import pydicom
import pytest

from pneumonia_cnn.errors import PneumoniaCNNError
from pneumonia_cnn.interop.dicom_access import NodeAccess
from pneumonia_cnn.interop.listener import Destination, Listener

from .orthanc import free_port
from .studies import xray_dicom
from .test_listen_receive import eventually
from .tls import authority, signed


def store(path, port: int, calling: str = "MODALITY", called: str = "PNEUMONIA", tls=None):
    """One C-STORE of the file at ``path``: its status, or None when no association was established."""
    from pynetdicom import AE
    dataset = pydicom.dcmread(path)
    ae = AE(ae_title=calling)
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", port, ae_title=called, tls_args=(tls, "127.0.0.1") if tls else None)
    if not association.is_established:
        return None
    status = association.send_c_store(dataset)
    association.release()
    return status.Status


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    hospital, rogue = authority(folder, "hospital"), authority(folder, "rogue")
    return {"ca": hospital[0], "node": signed(folder, "node", hospital), "sender": signed(folder, "sender", hospital),
            "destination": signed(folder, "destination", hospital), "rogue": signed(folder, "rogue", rogue)}


def client_tls(ca, certificate=None):
    context = ssl.create_default_context(cafile=str(ca))
    if certificate:
        context.load_cert_chain(*map(str, certificate))
    return context


def test_only_the_accepted_callers_addressing_this_node_get_in(trained_run, xray_sources, tmp_path, caplog):
    from pneumonia_cnn.inference import Predictor
    caplog.set_level(logging.INFO)
    listener = Listener(Predictor(trained_run, "cpu"), Destination("127.0.0.1", free_port(), "NOBODY"),
                        port=free_port(), spool=tmp_path / "spool", access=NodeAccess(accept_from=("MODALITY",)))
    listener.given = []
    listener._process = listener.given.extend
    path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "x.dcm", "DX", patient_id="ACC")
    listener.start(block=False)
    try:
        port = listener.address[1]
        assert store(path, port, calling="INTRUDER") is None
        assert store(path, port, called="OTHERNODE") is None
        assert not list(listener.incoming.iterdir())
        assert store(path, port) == 0x0000 and eventually(lambda: len(listener.given) == 1)
    finally:
        listener.stop()
    assert "association from INTRUDER (127.0.0.1:" in caplog.text
    assert ") rejected: calling AE title INTRUDER is not one of --accept-from (MODALITY)" in caplog.text
    assert ") rejected: it called AE title OTHERNODE, and this node is PNEUMONIA" in caplog.text
    assert NodeAccess().exposure_warning("0.0.0.0").startswith("listening on 0.0.0.0 for any sender: give ")
    assert NodeAccess(accept_from=("PACS",)).exposure_warning("0.0.0.0") is None
    assert NodeAccess().exposure_warning("127.0.0.1") is None


def test_images_in_and_reports_out_over_tls_with_certificates(trained_run, xray_sources, tmp_path, caplog,
                                                              certificates):
    """The node takes images only from senders whose certificate the hospital's CA signed, and sends the report
    to a destination that itself requires the node's certificate."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from pneumonia_cnn.inference import Predictor
    caplog.set_level(logging.INFO)
    destination_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certificates["ca"]))
    destination_tls.load_cert_chain(*map(str, certificates["destination"]))
    destination_tls.verify_mode = ssl.CERT_REQUIRED
    answered, destination = [], AE(ae_title="DEST")
    destination.supported_contexts = AllStoragePresentationContexts
    destination_port = free_port()
    server = destination.start_server(("127.0.0.1", destination_port), block=False, ssl_context=destination_tls,
                                      evt_handlers=[(evt.EVT_C_STORE, lambda e: answered.append(
                                          str(e.dataset.Modality)) or 0x0000)])
    node, key = map(str, certificates["node"])
    access = NodeAccess(tls_cert=node, tls_key=key, tls_ca=str(certificates["ca"]),
                        send_tls_ca=str(certificates["ca"]))
    listener = Listener(Predictor(trained_run, "cpu"), Destination("127.0.0.1", destination_port, "DEST"),
                        port=free_port(), spool=tmp_path / "spool", access=access, attempts=1)
    path = xray_dicom(xray_sources["PNEUMONIA"][0], tmp_path / "x.dcm", "DX", patient_id="TLS")
    listener.start(block=False)
    try:
        port = listener.address[1]
        assert store(path, port) is None  # plain DICOM to a TLS port
        assert store(path, port, tls=client_tls(certificates["ca"])) is None  # no certificate of its own
        assert store(path, port, tls=client_tls(certificates["ca"], certificates["rogue"])) is None
        assert not list(listener.incoming.iterdir())
        assert store(path, port, tls=client_tls(certificates["ca"], certificates["sender"])) == 0x0000
        assert eventually(lambda: len(listener.sent) == 1, timeout=60) and answered == ["SR"]
    finally:
        listener.stop()
        server.shutdown()
    assert f"listening as PNEUMONIA on 127.0.0.1:{port} (TLS); reports go to DEST@127.0.0.1:{destination_port} " \
           f"(TLS)" in caplog.text


def test_a_peer_that_connects_and_says_nothing_holds_no_other_tls_sender(trained_run, xray_sources, tmp_path,
                                                                          caplog, certificates, monkeypatch):
    """pynetdicom made the TLS handshake in its accept loop with no time limit: one silent TCP connection held
    every sender (and a stop) for as long as it stayed. The handshake now runs on the connection's own thread,
    within a time limit, and a failed one is a line."""
    import socket

    from pneumonia_cnn.inference import Predictor
    from pneumonia_cnn.interop import dicom_access
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(dicom_access, "HANDSHAKE_SECONDS", 2.0)
    node, key = map(str, certificates["node"])
    listener = Listener(Predictor(trained_run, "cpu"), Destination("127.0.0.1", free_port(), "NOBODY"),
                        port=free_port(), spool=tmp_path / "spool", attempts=1, retry_after=3600,
                        access=NodeAccess(tls_cert=node, tls_key=key, tls_ca=str(certificates["ca"])))
    listener.start(block=False)
    path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "x.dcm", "DX", patient_id="TLS2")
    try:
        with socket.create_connection(listener.address) as silent:
            started = time.monotonic()
            assert store(path, listener.address[1], tls=client_tls(certificates["ca"], certificates["sender"])) == 0
            assert time.monotonic() - started < 10
            timed_out = "TLS handshake failed (The handshake operation timed out): closed"
            assert eventually(lambda: timed_out in caplog.text, timeout=10)
            assert silent.recv(1) == b""  # closed by the node
        store(path, listener.address[1])  # plain DICOM to the TLS port
        assert eventually(lambda: caplog.text.count("TLS handshake failed") == 2, timeout=10), caplog.text
    finally:
        listener.stop()


def test_tls_options_are_checked_before_the_node_starts(certificates, tmp_path):
    node, key = map(str, certificates["node"])
    with pytest.raises(PneumoniaCNNError, match="^--tls-cert and --tls-key go together"):
        NodeAccess(tls_cert=node)
    with pytest.raises(PneumoniaCNNError, match="^--tls-ca needs --tls-cert and --tls-key"):
        NodeAccess(tls_ca=str(certificates["ca"]))
    (tmp_path / "not.pem").write_text("not a certificate\n")
    with pytest.raises(PneumoniaCNNError, match=rf"^--send-tls-ca {tmp_path / 'not.pem'}: cannot load \("):
        NodeAccess(send_tls_ca=str(tmp_path / "not.pem"))
    with pytest.raises(PneumoniaCNNError, match=r"^--tls-cert/--tls-key .*: cannot load \(No such file"):
        NodeAccess(tls_cert=node, tls_key=str(tmp_path / "missing.key"))
    with pytest.raises(PneumoniaCNNError, match=r"^--accept-from 'A\\\\B': an AE title has 1 to 16 printable ASCII"):
        NodeAccess(accept_from=("A\\B",))  # pynetdicom raised ValueError after the model had loaded
    # the reports' TLS trusts the given CA alone, not every authority the system knows
    assert NodeAccess(send_tls_ca=str(certificates["ca"])).client_context().cert_store_stats()["x509_ca"] == 1
