"""Run ``python -m lightning_fastif fit`` on a YAML config in a subprocess, as a user would."""

from __future__ import annotations

import json
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


def write_rows(path: Path, rows: list[dict[str, Any]]) -> str:
    """Write ``rows`` to ``path`` as JSON Lines and return the path as a string for a config."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def mnli_rows(count: int) -> list[dict[str, Any]]:
    """Return short MNLI-style rows with the three labels in turn."""
    labels = ["entailment", "neutral", "contradiction"]
    return [
        {"premise": f"A person number {i} walks.", "hypothesis": f"Someone {i} moves.", "label": labels[i % 3]}
        for i in range(count)
    ]


def use_small_data(config: dict[str, Any], folder: Path, hans_rows: list[dict[str, Any]]) -> None:
    """Point the config's data module at 40 training rows, 12 MNLI rows and ``hans_rows``, 32 tokens each."""
    config["data"]["init_args"].update(
        train_path=write_rows(folder / "train.jsonl", mnli_rows(40)),
        train_size=None,
        mnli_val_path=write_rows(folder / "val.jsonl", mnli_rows(12)),
        mnli_val_size=None,
        hans_val_path=write_rows(folder / "hans.jsonl", hans_rows),
        hans_val_size=None,
        max_length=32,
        batch_size=8,
        eval_batch_size=8,
    )


def use_tiny_bert(config: dict[str, Any]) -> None:
    """Replace the config's model with a tiny random BERT that uses the MiniLM tokenizer's vocabulary.

    The test then reads no pretrained weights.
    """
    config["model"]["init_args"] = {
        "from_config": {
            "vocab_size": 30522,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
        },
        "tokenizer_name_or_path": "all-MiniLM-L6-v2",
    }
