"""Run ``python -m lightning_fastif fit`` on a YAML config in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


def run_fit(config: dict[str, Any], folder: Path, *, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Write ``config`` to ``folder/config.yaml`` and run the CLI's fit on it with W&B offline.

    Returns the completed process, whose ``stdout`` and ``stderr`` hold the run's output as text.
    """
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lightning_fastif", "fit", "--config", str(path)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
