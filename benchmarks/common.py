"""What every benchmark script records: process memory, the git commit, the machine.

Scripts run as `python benchmarks/<name>.py`, so `benchmarks/` is on sys.path and they import
this as `common`.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict

REPO = Path(__file__).resolve().parents[1]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int:
    """Peak RSS of this process image (VmHWM). Not ru_maxrss: Linux carries the forking parent's
    high-water mark across exec into the child's ru_maxrss (a benchmark parent holds GBs)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def git_commit() -> str:
    """Short HEAD, "+dirty" when tracked files differ from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine_info(threads: int) -> Dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(cpu=cpu, cpu_count=os.cpu_count(), threads=threads, platform=platform.platform(),
                python=platform.python_version(), torch=torch.__version__, loadavg_start=list(os.getloadavg()))


def write_results(path: str, args: Any, **payload: Any) -> None:
    """The benchmark's JSON: its arguments, the commit, the machine and the load with `payload`
    ('' for `path`: nothing written)."""
    if not path:
        return
    import json

    import torch

    record = {"args": vars(args), "commit": git_commit(), "machine": machine_info(torch.get_num_threads()),
              "load_avg_1m": os.getloadavg()[0], **payload}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
