"""Run a command and measure wall time and the peak RSS of its whole process tree."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of a process and all its descendants (bytes)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run_measured(args, *, interval: float = 0.05, env=None, cwd=None) -> dict:
    """``{"seconds", "peak_rss_bytes", "stdout", "stderr", "returncode"}`` of ``args``."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd)
    watched = psutil.Process(proc.pid)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], tree_rss(watched))
            except psutil.NoSuchProcess:
                return
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    return {"seconds": time.perf_counter() - start, "peak_rss_bytes": peak[0], "stdout": stdout,
            "stderr": stderr, "returncode": proc.returncode}


def run_report(args, **kwargs) -> dict:
    """Run a benchmark runner (prints one JSON line last): that report, with the run's wall
    time (``wall``) and whole-tree peak RSS (``peak_gb``) added; exits if the run failed."""
    run = run_measured([str(a) for a in args], **kwargs)
    if run["returncode"]:
        raise SystemExit(f"{args} failed:\n{run['stderr'][-3000:]}")
    report = json.loads(run["stdout"].strip().splitlines()[-1])
    report["peak_gb"] = run["peak_rss_bytes"] / 1e9
    report["wall"] = run["seconds"]
    return report
