"""RunPod Hub entry: the Hub looks for a ``handler.py``; this worker's entrypoint is ``rp_handler.py``.

Runs ``rp_handler.py`` as ``__main__`` with the same arguments (``--test_input``, ``--rp_serve_api``).
"""

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
runpy.run_path(str(ROOT / "rp_handler.py"), run_name="__main__")
