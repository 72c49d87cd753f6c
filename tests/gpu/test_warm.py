"""``WARM_MODEL``: the worker loads the model before its first job, or exits saying why."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_entrypoint import printed_result, run_worker

pytestmark = pytest.mark.gpu


def test_warm_model_is_loaded_before_the_first_job(tmp_path: Path) -> None:
    """``health`` loads no model, so the pipeline it lists was loaded at start-up; the log says so
    before the job starts. Catches WARM_MODEL being ignored, or loaded lazily by the first job."""
    completed = run_worker(tmp_path, {"action": "health"}, WARM_MODEL="builtin:tiny-sd", MODEL_ID="builtin:tiny-sd")
    assert completed.returncode == 0, completed.stderr
    assert "builtin:tiny-sd (float32, cpu)" in printed_result(completed)["gpu"]["pipelines"]
    log = completed.stderr
    warmed = log.index("warm: builtin:tiny-sd loaded on cpu")
    assert warmed < log.index("local_test | Started"), log


def test_a_failed_warm_up_exits_with_one_clear_line(tmp_path: Path) -> None:
    """Catches a warm-up failure that is swallowed (the worker would then fail every GPU job)."""
    completed = run_worker(tmp_path, {"action": "health"}, WARM_MODEL="builtin:nope")
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "WARM_MODEL=builtin:nope could not be loaded" in completed.stderr
    assert "the worker exits" in completed.stderr and "Traceback" not in completed.stderr
    assert completed.stdout == ""
