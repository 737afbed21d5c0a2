"""Sub-commands beyond the foundation: report, compare, explain, export, serve, import-keras, adapt, stress."""
from __future__ import annotations


def add_commands(sub):
    return sub
