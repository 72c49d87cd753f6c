"""The output policy's decisions, pure: file sizes in, inline-or-redirect out (no I/O).

RunPod drops a result it cannot post (10 MB for ``/run``, 20 MB for ``/runsync``) and the
client sees COMPLETED with no output, so two rules hold for every response:

* a file over ``INLINE_MAX_BYTES`` is a redirect (:func:`initial_plan`);
* the serialized response stays under ``RESPONSE_MAX_BYTES``: when the measured response is
  over, the largest inline files become redirects until their base64 covers the excess
  (:func:`shrink_plan`). :mod:`services.output.files` carries the plan out and measures again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Delivery = Literal["inline", "redirect"]

# What a redirect adds in place of the inline data it replaces: its URL (a presigned URL with
# a session token runs to a few kB), key and expiry. Generous: an overestimate only moves one
# more file to storage, an underestimate costs one more render.
REDIRECT_ALLOWANCE = 4096


def base64_length(size: int) -> int:
    """Length of the base64 text of ``size`` bytes."""
    return 4 * ((size + 2) // 3)


def initial_plan(sizes: Sequence[int], inline_max: int) -> list[Delivery]:
    """Inline up to ``inline_max`` bytes, redirect the rest."""
    return ["redirect" if size > inline_max else "inline" for size in sizes]


def shrink_plan(sizes: Sequence[int], plan: Sequence[Delivery], excess: int) -> list[Delivery]:
    """``plan`` with the largest inline files turned into redirects until ``excess`` bytes are saved.

    Always moves at least one file while any is inline, so carrying out, measuring and
    shrinking again ends.
    """
    new = list(plan)
    inline = sorted((i for i, d in enumerate(plan) if d == "inline"), key=lambda i: sizes[i], reverse=True)
    saved = 0
    for index in inline:
        if saved >= excess and saved > 0:
            break
        new[index] = "redirect"
        saved += base64_length(sizes[index]) - REDIRECT_ALLOWANCE
    return new
