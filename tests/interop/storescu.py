"""A modality sending one file to a DICOM node, in a process of its own (so that the node's memory is measured
alone): ``python -m tests.interop.storescu FILE PORT [--die-after BYTES] [--abort]`` prints the C-STORE status.
``--die-after``: the process ends abruptly once that many bytes have gone out, inside the instance;
``--abort``: the association is aborted after the store instead of released."""
from __future__ import annotations

import argparse
import os

import pydicom
from pynetdicom import AE, evt


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("port", type=int)
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--abort", action="store_true")
    args = parser.parse_args()
    dataset = pydicom.dcmread(args.file)
    sent = [0]

    def count(event):
        sent[0] += len(event.data)
        if args.die_after and sent[0] > args.die_after:
            os._exit(3)  # as a crashed or unplugged modality: no release, no abort

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate("127.0.0.1", args.port, ae_title="PNEUMONIA",
                               evt_handlers=[(evt.EVT_DATA_SENT, count)])
    assert association.is_established, "no association"
    status = association.send_c_store(dataset)
    print(f"0x{status.Status:04X}" if "Status" in status else "none", flush=True)
    association.abort() if args.abort else association.release()


if __name__ == "__main__":
    main()
