"""Joining repair-study results: seeds pooled per setting, settings laid out together, bad joins rejected."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import join_repair_results  # noqa: E402

STRATEGIES = ["helpful", "random"]
ARGUMENTS = {
    "seeds": [0],
    "strategies": STRATEGIES,
    "num_steps": 2,
    "lr": 0.002,
    "num_examples": 10,
    "anchor_batch_size": 10,
    "anchors_from": "errors",
    "k": 100,
    "depth": 20,
    "validation_fraction": 0.2,
    "select_step": "best_validation",
    "output_dir": "outputs/a",
    "heuristics": ["lexical_overlap"],
}


def seed_summary(holdout_steps: list[float]) -> dict[str, Any]:
    """A per-seed summary as ``RepairResult.summary`` writes it, with step 1 selected."""
    metric = {"before": holdout_steps[0], "after": holdout_steps[-1], "selected": holdout_steps[1]}
    runs = {
        strategy: {
            name: {**metric, "steps": holdout_steps}
            for name in ("target_acc", "holdout_acc", "source_acc", "validation_acc")
        }
        | {"selected_step": 1}
        for strategy in STRATEGIES
    }
    return {"runs": runs}


def payload(name: str, seeds: dict[int, list[float]], **arguments: Any) -> dict[str, Any]:
    setting = {
        "name": name,
        "description": f"{name} target.",
        "sizes": {"target": 600, "pool": 300, "source": 100},
        "seconds": 60.0,
        "per_seed": {str(seed): seed_summary(steps) for seed, steps in seeds.items()},
        "aggregate": {},
    }
    return {"arguments": {**ARGUMENTS, "seeds": sorted(seeds), **arguments}, "settings": [setting]}


def test_setting_seeds_pooled() -> None:
    first = payload("lexical_overlap-hans", {0: [0.5, 0.52, 0.51], 1: [0.5, 0.55, 0.49]})
    second = payload("lexical_overlap-hans", {3: [0.5, 0.47, 0.46]}, output_dir="outputs/b")
    third = payload("lexical_overlap-mnli", {0: [0.4, 0.41, 0.42]}, heuristics=["constituent"])
    settings, args = join_repair_results.join([first, second, third], ["a", "b", "c"])
    assert args.seeds == [0, 1, 3]
    assert [setting["name"] for setting in settings] == ["lexical_overlap-hans", "lexical_overlap-mnli"]
    pooled = settings[0]
    assert list(pooled["per_seed"]) == ["0", "1", "3"]
    assert pooled["seconds"] == 120.0
    after = pooled["aggregate"]["helpful"]["holdout_acc/after"]
    assert after["n"] == 3
    assert after["mean"] == pytest.approx(statistics.fmean([0.51, 0.49, 0.46]))
    assert after["std"] == pytest.approx(statistics.stdev([0.51, 0.49, 0.46]))
    assert pooled["aggregate"]["helpful"]["holdout_acc/selected"]["mean"] == pytest.approx(
        statistics.fmean([0.52, 0.55, 0.47])
    )


def test_command_writes_joined_tables(tmp_path: Path) -> None:
    paths = []
    for index, seeds in enumerate(({0: [0.5, 0.52, 0.51]}, {1: [0.5, 0.56, 0.55]})):
        path = tmp_path / f"run{index}" / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps(payload("subsequence-hans", seeds)))
        paths.append(str(path))
    join_repair_results.main([*paths, "--output-dir", str(tmp_path / "joined")])
    markdown = (tmp_path / "joined" / "results.md").read_text()
    assert "over seeds [0, 1]" in markdown
    # Held-out change after the last step: +1.0 and +5.0 points, so +3.0 ± 2.8.
    assert "| subsequence-hans | +3.0 ± 2.8 |" in markdown
    joined = json.loads((tmp_path / "joined" / "results.json").read_text())
    assert list(joined["settings"][0]["per_seed"]) == ["0", "1"]


def test_older_run_joins_newer() -> None:
    # Runs written before `update_parameters` existed used every parameter.
    older = payload("constituent-hans", {0: [0.5, 0.5, 0.5]})
    newer = payload("constituent-hans", {1: [0.5, 0.6, 0.6]}, update_parameters="all")
    settings, args = join_repair_results.join([older, newer], ["a", "b"])
    assert args.update_parameters == "all"
    assert list(settings[0]["per_seed"]) == ["0", "1"]
    other = payload("constituent-hans", {1: [0.5, 0.6, 0.6]}, update_parameters="influence")
    with pytest.raises(ValueError, match="b ran with update_parameters='influence' but a with update_parameters='all'"):
        join_repair_results.join([older, other], ["a", "b"])


def test_same_seed_twice_is_rejected() -> None:
    first = payload("constituent-hans", {0: [0.5, 0.5, 0.5]})
    second = payload("constituent-hans", {0: [0.5, 0.6, 0.6]})
    with pytest.raises(ValueError, match="Seed 0 of setting constituent-hans is in both a and b. Pass each seed once."):
        join_repair_results.join([first, second], ["a", "b"])


def test_other_study_settings_are_rejected() -> None:
    first = payload("constituent-hans", {0: [0.5, 0.5, 0.5]})
    second = payload("constituent-hans", {1: [0.5, 0.6, 0.6]}, lr=0.001)
    with pytest.raises(ValueError, match=r"b ran with lr=0.001 but a with lr=0.002\. Join only runs"):
        join_repair_results.join([first, second], ["a", "b"])


def test_missing_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        join_repair_results.main([str(tmp_path / "nope.json"), "--output-dir", str(tmp_path / "out")])
    assert f"No such file: {tmp_path / 'nope.json'}" in capsys.readouterr().err
