"""Which names from a response may become a local file name.

The worker's own rules for a file name (``services/storage/keys.py``: no separators, no ``..``,
no control or invisible characters, at most 255 bytes), repeated here because the client
imports nothing of the worker, plus what makes a name unsafe on Windows: a drive (``C:x``),
an alternate data stream (``a.png:evil``), a reserved device name (``CON``, ``NUL.txt``,
``COM1``) and a trailing dot or space (Windows drops it). Names are checked, never rewritten.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from client.errors import DownloadError

MAX_NAME_BYTES = 255
# Control (Cc), format (Cf: bidi overrides, zero-width), line/paragraph separators, lone surrogates.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_DEVICES = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
_DEVICES |= {f"{port}{digit}" for port in ("COM", "LPT") for digit in (*"123456789", "¹", "²", "³")}


def _character_problem(name: str) -> str | None:
    for ch in name:
        category = unicodedata.category(ch)
        if category in REFUSED_CATEGORIES:
            kind = {"Cc": "control", "Cs": "lone surrogate"}.get(category, "invisible or format")
            return f"contains {kind} characters (U+{ord(ch):04X})"
    return None


def local_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be a file name inside the output folder, or ``None`` when it can."""
    if not isinstance(name, str) or not name:
        return "is not a non-empty string"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if name in (".", "..") or ".." in name:
        return "holds '..'"
    if ":" in name:
        return "holds ':' (a Windows drive or alternate data stream)"
    if problem := _character_problem(name):
        return problem
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if name.endswith((".", " ")):
        return "ends with a dot or a space (Windows drops them)"
    if name.split(".", 1)[0].rstrip(" ").upper() in _DEVICES:
        return "is a reserved device name on Windows"
    return None


def local_name(name: Any) -> str:
    """``name`` itself when it is a safe local file name, else :class:`DownloadError`."""
    if problem := local_name_problem(name):
        raise DownloadError(f"output file name {str(name)[:100]!r} {problem}: refused")
    return name
