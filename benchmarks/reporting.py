"""Helpers that the benchmark scripts share: machine facts, peak RSS and the docs section they rewrite."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
import transformers


def read_status_kib(field: str) -> int:
    """Return a ``kB`` field of ``/proc/self/status``, such as ``VmRSS`` or ``VmHWM``, in KiB."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field!r} field; peak RSS cannot be measured here.")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu_model()}, {usable} usable cores ({os.cpu_count()} visible), torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def load_average() -> str:
    """Return the 1-minute load average as text, to show whether other processes shared the cores."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def replace_section(path: Path, title: str, section: str) -> None:
    """Write ``section`` into ``path``, replacing the section headed ``## title`` and keeping the rest."""
    heading = f"## {title}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Benchmarks\n\n" + section, encoding="utf-8")
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip() == heading]
    if not starts:
        text = "".join(lines).rstrip("\n")
        path.write_text(text + "\n\n" + section, encoding="utf-8")
        return
    start = starts[0]
    # The section ends at the next heading of the same or a higher level.
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines))
    tail = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + section + ("\n" + tail if tail else ""), encoding="utf-8")
