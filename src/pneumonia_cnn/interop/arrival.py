"""What ``listen`` does while an instance arrives. Its size limit is enforced as the data comes in, not once it
has: the bytes of each association's data set are counted from the P-DATA-TF PDUs (PS3.8 section 9.3.5), and an
association whose instance passes ``--max-instance-mb`` is aborted there, so a larger instance never fills the
disk that pynetdicom writes it to (a command set, which pynetdicom keeps in memory, past 64 KB likewise). A
connection that ends inside an instance leaves no partial file. And no PDU longer than ``MAX_PDU_BYTES`` is
read: pynetdicom gathers a whole PDU in memory before anything looks at it, so one announced as 4 GB (an
association request, before any AE title is checked) would fill the memory as fast as a peer sends it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import struct
import tempfile
import threading
import weakref
from pathlib import Path

from ..fileio import display_path

log = logging.getLogger("pneumonia_cnn")
P_DATA_TF = 0x04
PDU_HEADER, ITEM_HEADER = 6, 6  # type, reserved, length; item length, context id, message control header
COMMAND, LAST_FRAGMENT = 0x01, 0x02  # bits of the message control header
# the node asks for P-DATA PDUs of at most 16,382 bytes (pynetdicom's default), and an association request
# with a hundred presentation contexts takes tens of KB: 4 MB leaves every conforming peer far below it
MAX_PDU_BYTES = 4 * 2**20
MAX_COMMAND_BYTES = 64 * 2**10


def fragments(pdu: bytes) -> list[tuple[bool, int, bool]]:
    """(command, bytes, last) for each fragment of one P-DATA-TF PDU; none for another PDU type. A PDU that
    lies about its lengths ends the walk (the DUL refuses it anyway)."""
    if len(pdu) < PDU_HEADER or pdu[0] != P_DATA_TF:
        return []
    found, offset = [], PDU_HEADER
    while offset + ITEM_HEADER <= len(pdu):
        length, control = struct.unpack_from(">I", pdu, offset)[0], pdu[offset + 5]
        if length < 2:
            break
        found.append((bool(control & COMMAND), length - 2, bool(control & LAST_FRAGMENT)))
        offset += 4 + length
    return found


class ArrivalLimit:
    """Counts the bytes of the message each association is sending, its data set and its command set apart;
    ``on_data`` is pynetdicom's EVT_DATA_RECV handler (called on the connection's reader thread for every PDU
    received)."""

    def __init__(self, max_instance_mb: float):
        self.max_instance_mb, self.limit = max_instance_mb, int(max_instance_mb * 2**20)
        self.arriving: dict[tuple[int, bool], int] = {}
        self.lock = threading.Lock()

    def on_data(self, event):
        assoc = event.assoc
        if assoc.is_aborted:
            return
        for command, size, last in fragments(event.data):
            with self.lock:
                total = self.arriving.get((id(assoc), command), 0) + size
                self.arriving[(id(assoc), command)] = 0 if last else total
            # pynetdicom gathers a command set in memory; a real one takes a few hundred bytes
            if total > (MAX_COMMAND_BYTES if command else self.limit):
                log.warning("instance from %s: aborted as it arrived: %s", peer(assoc),
                            "a command set of more than 64 KB" if command
                            else f"more than {self.max_instance_mb:g} MB (--max-instance-mb)")
                assoc.abort(block=False)  # from inside an event handler: queued for the DUL, which sends it
                return

    @staticmethod
    def on_open(event):
        """pynetdicom's EVT_CONN_OPEN handler: the connection's socket refuses to read a PDU longer than
        MAX_PDU_BYTES (reading nothing, as from a closed connection, ends the association)."""
        sock, address = event.assoc.dul.socket, event.address
        read = sock.recv

        def bounded_read(count: int):
            if count > MAX_PDU_BYTES:
                log.warning("connection from %s:%s: a PDU of %d bytes announced, above the %d MB read here: "
                            "closed", address[0], address[1], count, MAX_PDU_BYTES // 2**20)
                return bytearray()
            return read(count)
        sock.recv = bounded_read

    def on_close(self, event):
        """pynetdicom's EVT_CONN_CLOSE handler: a connection that ends inside an instance leaves pynetdicom's
        temporary file of it behind; delete it."""
        with self.lock:
            for command in (False, True):
                self.arriving.pop((id(event.assoc), command), None)
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        partial = getattr(message, "_data_set_path", None)
        if partial is None:
            return
        with contextlib.suppress(OSError):
            message._data_set_file.close()
        with contextlib.suppress(OSError):
            size = Path(partial).stat().st_size
            Path(partial).unlink()
            log.warning("connection with %s ended inside an instance (%.1f MB received): discarded, not "
                        "acknowledged", peer(event.assoc), size / 2**20)


# the folder each of this process's nodes receives into, by its pynetdicom AE; another AE (a test's destination)
# gets pynetdicom's own temporary file
RECEIVING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
ABORTED_HERE: weakref.WeakSet = weakref.WeakSet()  # associations a failed write aborted: their line is said


def receive_into(ae, folder: Path):
    """pynetdicom writes each instance arriving at ``ae`` to a temporary file of its own (tempfile's default
    folder: no setting of its own chooses it); here into ``folder``, the spool's, whose disk the spool's checks
    watch and whose leftovers a start removes. A file that cannot be written aborts the association (ReceivingFile)."""
    from pynetdicom import dimse_messages
    RECEIVING[ae] = Path(folder)
    dimse_messages.NamedTemporaryFile = receiving_file


def receiving_file(*args, **kwargs):
    """pynetdicom's NamedTemporaryFile for a C-STORE's data set, called on the connection's own thread (the
    DULServiceProvider, whose ``assoc`` is the association)."""
    association = getattr(threading.current_thread(), "assoc", None)
    folder = RECEIVING.get(getattr(association, "ae", None))
    if folder is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    return ReceivingFile(folder, association)


class ReceivingFile:
    """One arriving instance's file in SPOOL/receiving. A write that fails (the disk full, the folder gone)
    raised on the connection's thread: that thread died with a traceback, the association hung with no status
    and the partial file stayed. Now the file is deleted, the association aborted (the sender has no
    acknowledgement and sends the instance again) and one line says why; the rest of the data is dropped."""

    def __init__(self, folder: Path, association):
        self.folder, self.association, self.failed, self._file = folder, association, False, None
        self.file = self  # pynetdicom flushes ``file.file``
        try:
            folder.mkdir(exist_ok=True)  # removed while the node runs: receiving had stopped until a restart
            self._file = tempfile.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm", dir=folder)
            self.name = self._file.name
        except OSError as error:
            self.name = str(folder / "not-created.dcm")
            self._fail(error)

    def write(self, data) -> int:
        if not self.failed:
            try:
                return self._file.write(data)
            except OSError as error:
                self._fail(error)
        return len(data)

    def flush(self):
        if not self.failed:
            try:
                self._file.flush()
            except OSError as error:
                self._fail(error)

    def close(self):
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()

    def _fail(self, error: OSError):
        self.failed = True
        self.close()
        with contextlib.suppress(OSError):
            os.unlink(self.name)
        log.warning("instance from %s: cannot be received: writing it to %s failed (%s): association aborted, "
                    "not acknowledged (the sender sends it again)", peer(self.association),
                    display_path(self.folder), error.strerror or error)
        ABORTED_HERE.add(self.association)
        self.association.abort(block=False)  # from the connection's thread: queued for the DUL, which sends it


def peer(association) -> str:
    requestor = association.requestor
    return f"{requestor.ae_title} ({requestor.address}:{requestor.port})"


JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"


@functools.lru_cache(maxsize=1)
def decodable_transfer_syntaxes() -> tuple[str, ...]:
    """The transfer syntaxes whose pixel data this installation decodes: the native ones, and the compressed
    ones for which pydicom has a working decoder (GDCM, Pillow, CharLS...). The node offers these alone, so a
    sender converts anything else before sending instead of having it acknowledged and never read."""
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID
    from pynetdicom import ALL_TRANSFER_SYNTAXES
    decodable = []
    for uid in map(UID, ALL_TRANSFER_SYNTAXES):
        try:
            decoder = get_decoder(uid) if uid.is_compressed else None
        except NotImplementedError:  # video, JPEG XL, JPIP...: pydicom has no decoder for them at all
            continue
        # GDCM and Pillow decode JPEG Extended's 8-bit form only, and an X-ray archive's is 12-bit: only
        # pylibjpeg-libjpeg (GPL, not a dependency) decodes that
        twelve_bit = uid != JPEG_EXTENDED or "pylibjpeg" in getattr(decoder, "available_plugins", ())
        if decoder is None or decoder.is_available and twelve_bit:
            decodable.append(str(uid))
    return tuple(decodable)
