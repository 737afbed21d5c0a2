"""The patient's age from DICOM tags: what the intended-use checks compare with the training population's
range, read by ``ood.checks`` and kept in the cache's manifest (the age, never the birth date)."""
from __future__ import annotations


def _age_years(text: str | None):
    """DICOM Age String (``nnnD``, ``nnnW``, ``nnnM``, ``nnnY``) in years; None when absent or unreadable."""
    if not text:
        return None
    text = text.strip().upper()
    try:
        if text[-1] in "DWMY":
            return float(text[:-1]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        return None


def _date(text: str | None):
    from datetime import datetime
    try:
        return datetime.strptime((text or "").strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def patient_age_years(tags: dict):
    """PatientAge, else the years from PatientBirthDate to StudyDate (or AcquisitionDate); None if unknown."""
    age = _age_years(tags.get("PatientAge"))
    if age is not None:
        return age
    born = _date(tags.get("PatientBirthDate"))
    taken = _date(tags.get("StudyDate")) or _date(tags.get("AcquisitionDate"))
    if born is None or taken is None or taken < born:
        return None
    return (taken - born).days / 365.25
