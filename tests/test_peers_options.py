"""Option checks of the peers benchmark driver (``benchmarks/peers.py``), which exit before any method runs."""

import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


def run_driver(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), *options], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--dattri-on-candidates", "--methods", "fastif-1", "dattri"],
            "--dattri-on-candidates needs --setting minilm, got --setting logistic.",
        ),
        (
            ["--setting", "minilm", "--dattri-on-candidates", "--methods", "dattri", "fastif-1"],
            "--dattri-on-candidates needs fastif-1 before dattri in --methods, got dattri fastif-1. "
            "List fastif-1 first, for example --methods fastif-1 dattri.",
        ),
        (
            ["--setting", "minilm", "--dattri-on-candidates", "--methods", "dattri"],
            "--dattri-on-candidates needs fastif-1 before dattri in --methods, got dattri.",
        ),
        (
            ["--setting", "minilm", "--dattri-train-batch-size", "0"],
            "--dattri-train-batch-size must be at least 1, got 0.",
        ),
    ],
)
def test_driver_rejects_dattri_options(options, message, tmp_path):
    completed = run_driver(*options, "--out-dir", str(tmp_path / "out"))
    assert completed.returncode == 2
    assert message in completed.stderr
    assert not (tmp_path / "out").exists()
