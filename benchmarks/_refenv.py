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


def reference_command(inputs: Path, configs: list[dict], output: Path, *,
                      measure: bool = False) -> list[str]:
    """The command that fits each config with the reference package on ``inputs`` (npz),
    results to ``output``; ``measure`` warms its kernels up and times its phases."""
    args = [str(ensure_reference_env()), str(HERE / "reference_runner.py"), str(inputs),
            json.dumps(configs), str(output)]
    return args + ["--measure"] if measure else args


def run_reference(inputs: Path, configs: list[dict], output: Path) -> dict:
    """Run :func:`reference_command`; the runner's JSON report (times, iterations, lambda)."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(reference_command(inputs, configs, output), check=True,
                          capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])
