"""Result records of an influence run: rows for tables, JSON Lines files and W&B logging."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_fastif.fastif import QueryInfluence

log = logging.getLogger(__name__)

TABLE_COLUMNS = [
    "query_index",
    "query_text",
    "query_label",
    "prediction",
    "train_index",
    "train_text",
    "train_label",
    "score",
    "rank",
    "kind",
]
"""Columns of every influence table; ``kind`` is "helpful" (negative score) or "harmful" (positive score)."""


def influence_rows(
    results: Sequence[QueryInfluence],
    *,
    query_text: Callable[[int], str],
    query_label: Callable[[int], str],
    prediction: Callable[[int], str],
    train_text: Callable[[int], str],
    train_label: Callable[[int], str],
) -> list[dict[str, Any]]:
    """Build one row per (query, top example): ``2 * top_k`` rows per query, helpful first.

    For an anchor-batch query (several query indices), the query columns describe its first example.
    """
    rows = []
    for result in results:
        query = int(result.query_indices[0])
        common = {
            "query_index": query,
            "query_text": query_text(query),
            "query_label": query_label(query),
            "prediction": prediction(query),
        }
        top = result.top
        ranked = [
            ("helpful", top.helpful_indices, top.helpful_scores),
            ("harmful", top.harmful_indices, top.harmful_scores),
        ]
        for kind, indices, scores in ranked:
            for rank, (train_index, score) in enumerate(zip(indices.tolist(), scores.tolist(), strict=True), start=1):
                rows.append(
                    {
                        **common,
                        "train_index": int(train_index),
                        "train_text": train_text(int(train_index)),
                        "train_label": train_label(int(train_index)),
                        "score": float(score),
                        "rank": rank,
                        "kind": kind,
                    }
                )
    return rows


def stage_timings(results: Iterable[QueryInfluence]) -> dict[str, float]:
    """Sum the seconds of each stage over queries."""
    totals: dict[str, float] = {}
    for result in results:
        for stage, seconds in result.timings.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
    return totals


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as JSON Lines, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON Lines file written by :func:`write_jsonl`."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def log_wandb(
    run: Any, rows: Sequence[dict[str, Any]], scores: Sequence[float], metrics: dict[str, float], *, key: str
) -> None:
    """Log a table of the rows, a histogram of every candidate score and stage timings to a W&B run."""
    import wandb

    columns: list[str | int] = list(TABLE_COLUMNS)
    table = wandb.Table(columns=columns, data=[[row[column] for column in TABLE_COLUMNS] for row in rows])
    payload: dict[str, Any] = {f"{key}/top_examples": table, **metrics}
    if scores:
        payload[f"{key}/scores"] = wandb.Histogram(list(scores))
    run.log(payload)
