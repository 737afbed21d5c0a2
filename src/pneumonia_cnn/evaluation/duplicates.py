"""Evaluated images that are one file under several names (the same bytes), and the notes that say so."""
from __future__ import annotations

from pathlib import Path

from ..fileio import printable


def duplicate_groups(cached, fingerprints) -> list[dict]:
    """Evaluated images that are one file under different names (the same bytes: SHA-256, as the refusal of a
    decision's own images compares them), with each copy's label. They stay in the metrics."""
    by_content: dict[str, list[int]] = {}
    for index, fingerprint in enumerate(fingerprints):
        by_content.setdefault(fingerprint, []).append(index)
    return [{"paths": [cached.paths[i] for i in group],
             "labels": [cached.class_names[int(cached.labels[i])] for i in group],
             "conflicting": len({int(cached.labels[i]) for i in group}) > 1}
            for group in by_content.values() if len(group) > 1]


def duplicate_notes(groups: list[dict], data, shown: int = 3) -> list[str]:
    """At most two lines: the groups of identical images, then those whose copies have different labels."""
    base = Path(data) if Path(data).is_dir() else Path(data).parent

    def name(path):
        return printable(Path(path).relative_to(base) if Path(path).is_relative_to(base) else path)

    def listed(chosen, labelled=False):
        text = "; ".join(" = ".join(name(p) + (f" ({label})" if labelled else "")
                                    for p, label in zip(g["paths"], g["labels"])) for g in chosen[:shown])
        return text + (f"; and {len(chosen) - shown} more (all in the JSON's duplicates)" if len(chosen) > shown
                       else "")
    if not groups:
        return []
    copies = sum(len(g["paths"]) for g in groups)
    notes = [f"{len(groups)} group{'s' if len(groups) > 1 else ''} of identical images (the same file bytes) under "
             f"different names, {copies} images in all, each counted in the metrics: {listed(groups)}"]
    conflicting = [g for g in groups if g["conflicting"]]
    if conflicting:
        notes.append(f"conflicting labels, the same image under two classes ({len(conflicting)} group"
                     f"{'s' if len(conflicting) > 1 else ''}): {listed(conflicting, labelled=True)}")
    return notes
