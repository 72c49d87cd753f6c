"""Cold start: a storage job end to end against the bare ``import runpod``, in one run.

    python bench/cold_start.py [--repeat 5]

Times, alternating so machine noise hits both alike:

* baseline: ``python -c "import runpod"`` (what any RunPod worker pays);
* worker:   ``python rp_handler.py --test_input <an upload job>`` (start, validate, upload
  to the local backend, respond, exit).

Prints the medians and the ratio; the target is at most 1.3x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPLOAD_JOB = {
    "input": {
        "action": "upload_training_files",
        "dataset": "cold-start",
        "files": [{"name": f"caption_{i}.txt", "data": "YSBwaG90byBvZiBza3M="} for i in range(8)],
    }
}


def _time(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{completed.stdout}\n{completed.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command (default 5)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        cwd = Path(work)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_", "BUCKET_"))}
        env.update({"STORAGE_DIR": str(cwd / "storage"), "PYTHONPATH": str(ROOT)})
        baseline_cmd = [sys.executable, "-c", "import runpod"]
        worker_cmd = [sys.executable, str(ROOT / "rp_handler.py"), "--test_input", json.dumps(UPLOAD_JOB)]
        _time(baseline_cmd, cwd, env)  # warm the file cache for both
        _time(worker_cmd, cwd, env)
        baseline, worker = [], []
        for _ in range(args.repeat):
            baseline.append(_time(baseline_cmd, cwd, env))
            worker.append(_time(worker_cmd, cwd, env))

    base, ours = statistics.median(baseline), statistics.median(worker)
    print(f"{'command':<48} {'median s':>9} {'min s':>7} {'ratio':>6}")
    rows = [
        ('python -c "import runpod"', base, min(baseline), 1.0),
        ("python rp_handler.py --test_input <upload job>", ours, min(worker), ours / base),
    ]
    for name, median, fastest, ratio in rows:
        print(f"{name:<48} {median:>9.3f} {fastest:>7.3f} {ratio:>6.2f}")
    print(f"target: at most 1.30x -> {'met' if ours / base <= 1.3 else 'NOT met'}")


if __name__ == "__main__":
    main()
