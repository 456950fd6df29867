"""The reference package ``flashdeconv==0.2.0`` in its own virtual environment.

It pins older numpy/numba than dflashdeconv, so it lives in ``benchmarks/.refvenv`` and is
driven through subprocesses (``reference_runner.py``); nothing of it is imported here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REF_VENV = HERE / ".refvenv"
REF_PYTHON = REF_VENV / "bin" / "python"
REFERENCE_SPEC = "flashdeconv==0.2.0"


def ensure_reference_env() -> Path:
    """Create ``benchmarks/.refvenv`` with the reference package if it is missing."""
    if not REF_PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(REF_VENV)], check=True)
        subprocess.run([str(REF_PYTHON), "-m", "pip", "install", "--quiet", REFERENCE_SPEC,
                        "psutil"], check=True)
    return REF_PYTHON


def run_reference(inputs: Path, configs: list[dict], output: Path, *, measure: bool = False):
    """Fit each config with the reference package on ``inputs`` (npz); results to ``output``.

    Returns the runner's JSON report (times, iterations, lambda, peak RSS when ``measure``).
    """
    python = ensure_reference_env()
    env = dict(os.environ, PYTHONHASHSEED="0")
    args = [str(python), str(HERE / "reference_runner.py"), str(inputs), json.dumps(configs),
            str(output)]
    if measure:
        args.append("--measure")
    done = subprocess.run(args, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])
