"""``services.output.plan`` as the pure function it is documented to be: sizes in, decisions out,
no storage. The render loop of :mod:`services.output.files` (plan, measure, shrink, measure
again) is replayed here with a model of the response's size, against the 5 MB inline limit
and RunPod's payload limits (10 MB for ``/run``, 20 MB for ``/runsync``)."""

from __future__ import annotations

import base64
from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from config.settings import build_settings
from services.output.plan import REDIRECT_ALLOWANCE, Delivery, base64_length, initial_plan, shrink_plan

MB = 1024 * 1024
RUN_LIMIT = 10 * MB  # RunPod drops a larger /run result
RUNSYNC_LIMIT = 20 * MB  # and a larger /runsync one
ENVELOPE = 2_000  # the result's other fields
PER_FILE = 300  # name, mime, size, key of one output
REDIRECT = 2_500  # a presigned URL with a session token, key and expiry (under the allowance)


def response_size(sizes: Sequence[int], plan: Sequence[Delivery]) -> int:
    """What the serialized response weighs, the way the policy measures it."""
    body = sum(base64_length(s) if d == "inline" else REDIRECT for s, d in zip(sizes, plan, strict=True))
    return ENVELOPE + PER_FILE * len(sizes) + body


def render(sizes: Sequence[int], inline_max: int, response_max: int) -> tuple[list[Delivery], int]:
    """The policy's loop: the final plan and how many times it shrank."""
    plan = initial_plan(sizes, inline_max)
    rounds = 0
    while "inline" in plan and (excess := response_size(sizes, plan) - response_max) > 0:
        plan = shrink_plan(sizes, plan, excess)
        rounds += 1
    return plan, rounds


def test_base64_length_is_the_encoded_length() -> None:
    """Catches an estimate off by the padding (which would let a response creep over the limit)."""
    for size in [*range(12), 3 * MB - 1, 3 * MB, 5 * MB + 1]:
        assert base64_length(size) == len(base64.b64encode(bytes(size)))


def test_inline_limit_boundary_is_inclusive() -> None:
    """A file of exactly INLINE_MAX_BYTES (5 MB) is inline, one byte more is a redirect: catches
    an off-by-one and a default that drifted from the documented 5 MB."""
    inline_max = build_settings().inline_max_bytes
    assert inline_max == 5 * MB
    assert initial_plan([inline_max, inline_max + 1, 0], inline_max) == ["inline", "redirect", "inline"]
    assert initial_plan([1, 0], 0) == ["redirect", "inline"]  # INLINE_MAX_BYTES=0: every byte goes to storage


def test_default_response_limit_fits_runpods_run_payload() -> None:
    """RESPONSE_MAX_BYTES defaults under /run's 10 MB, so /run and /runsync both deliver it."""
    assert build_settings().response_max_bytes < RUN_LIMIT


def test_shrink_moves_the_largest_inline_files_first_and_only_as_many_as_needed() -> None:
    sizes = [1 * MB, 4 * MB, 2 * MB, 3 * MB]
    plan: list[Delivery] = ["inline"] * 4
    new = shrink_plan(sizes, plan, excess=base64_length(4 * MB) - REDIRECT_ALLOWANCE)
    assert new == ["inline", "redirect", "inline", "inline"]
    assert plan == ["inline"] * 4  # the input plan is left as it was
    two = shrink_plan(sizes, plan, excess=base64_length(4 * MB))  # one file's base64 is not quite enough
    assert two == ["inline", "redirect", "inline", "redirect"]


def test_shrink_always_moves_one_file_so_the_loop_ends() -> None:
    """Even when the excess is nothing, or smaller than what a redirect adds (catches a loop that
    measures the same over-size response forever)."""
    assert shrink_plan([10_000, 20_000], ["inline", "inline"], excess=0) == ["inline", "redirect"]
    assert shrink_plan([10], ["inline"], excess=1) == ["redirect"]  # smaller than a redirect: moved anyway
    assert shrink_plan([10, 20], ["redirect", "redirect"], excess=5 * MB) == ["redirect", "redirect"]


def test_many_small_files_end_under_runpods_limits() -> None:
    """200 files of 100 kB (27 MB of base64, each under the inline limit): the response ends
    under the limit while keeping as many files inline as fit."""
    sizes = [100_000] * 200
    for limit in (build_settings().response_max_bytes, RUN_LIMIT, RUNSYNC_LIMIT):
        plan, rounds = render(sizes, 5 * MB, limit)
        assert response_size(sizes, plan) <= limit
        assert 0 < plan.count("inline") < len(sizes)
        assert rounds <= len(sizes)
        one_more = [d if i != plan.index("redirect") else "inline" for i, d in enumerate(plan)]
        assert response_size(sizes, one_more) > limit - base64_length(100_000) - PER_FILE


def test_large_files_go_to_storage_and_small_ones_stay_inline() -> None:
    """Two 6 MB images and one small: the big ones are redirects from the start, no shrink needed."""
    sizes = [6 * MB, 6 * MB, 50_000]
    plan, rounds = render(sizes, 5 * MB, RUN_LIMIT)
    assert plan == ["redirect", "redirect", "inline"]
    assert rounds == 0


@given(
    st.lists(st.integers(0, 8 * MB), max_size=60),
    st.integers(0, 20 * MB),
    st.sampled_from([9 * MB, RUN_LIMIT, RUNSYNC_LIMIT]),
)
def test_any_outputs_end_under_the_limit_or_all_redirected(sizes: list[int], inline_max: int, limit: int) -> None:
    plan, rounds = render(sizes, inline_max, limit)
    assert rounds <= len(sizes)
    assert response_size(sizes, plan) <= limit or "inline" not in plan
    assert all(d == "redirect" for s, d in zip(sizes, plan, strict=True) if s > inline_max)
