"""The LightningCLI entry point builds model, data, logger and callbacks from YAML and runs them."""

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers.cli import run_fit, use_small_data, use_tiny_bert

ROOT = Path(__file__).resolve().parents[1]


def hans_rows(count: int) -> list[dict]:
    return [
        {
            "premise": f"The doctor {i} saw the lawyer .",
            "hypothesis": f"The lawyer {i} saw the doctor .",
            "label": "non-entailment",
            "heuristic": "lexical_overlap",
            "subcase": "ln_subject/object_swap",
            "template": "temp1",
        }
        for i in range(count)
    ]


def test_cli_fit_runs_influence_from_yaml(tmp_path):
    quick = yaml.safe_load((ROOT / "examples" / "mnli_hans" / "quick.yaml").read_text())
    use_small_data(quick, tmp_path, hans_rows(12))
    use_tiny_bert(quick)
    run_dir = tmp_path / "run"
    quick["trainer"].update(default_root_dir=str(run_dir), limit_train_batches=2, enable_progress_bar=False)
    quick["trainer"]["logger"]["init_args"]["save_dir"] = str(run_dir)
    checkpoint, influence = quick["trainer"]["callbacks"]
    checkpoint["init_args"]["dirpath"] = str(run_dir / "checkpoints")
    influence["init_args"].update(k=20, top_k=2, depth=5, max_queries=2, progress=False)
    result = run_fit(quick, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "influence" / "step_2.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2  # 2 queries, 2 helpful and 2 harmful each
    assert {row["kind"] for row in rows} == {"helpful", "harmful"}
    assert all(row["query_label"] == "non-entailment" for row in rows)
    assert (run_dir / "checkpoints" / "minilm-mnli.ckpt").exists()
    assert "val/hans_acc" in result.stderr + result.stdout


@pytest.mark.parametrize("name", ["config.yaml", "quick.yaml", "full.yaml"])
def test_example_configs_parse(name):
    from pytorch_lightning.cli import LightningCLI

    config = ROOT / "examples" / "mnli_hans" / name
    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(args=["fit", "--config", str(config), "--print_config"], run=True)
    assert exit_info.value.code == 0
