"""DICOM UIDs as the network side checks them, without importing pydicom: digits in dot-separated groups, at
most 64 characters."""
from __future__ import annotations

import re

UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_uid(value) -> bool:
    return value is not None and len(str(value)) <= 64 and UID_PATTERN.fullmatch(str(value)) is not None
