"""The LightningCLI entry point builds model, data, logger and callbacks from YAML and runs them."""

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers.cli import run_fit

ROOT = Path(__file__).resolve().parents[1]


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def nli_rows(count: int) -> list[dict]:
    labels = ["entailment", "neutral", "contradiction"]
    return [
        {"premise": f"A person number {i} walks.", "hypothesis": f"Someone {i} moves.", "label": labels[i % 3]}
        for i in range(count)
    ]


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
    data = quick["data"]["init_args"]
    data.update(
        train_path=write_rows(tmp_path / "train.jsonl", nli_rows(40)),
        train_size=None,
        mnli_val_path=write_rows(tmp_path / "val.jsonl", nli_rows(12)),
        mnli_val_size=None,
        hans_val_path=write_rows(tmp_path / "hans.jsonl", hans_rows(12)),
        hans_val_size=None,
        max_length=32,
        batch_size=8,
        eval_batch_size=8,
    )
    # A tiny random BERT with the MiniLM tokenizer's vocabulary, so the test reads no weights.
    quick["model"]["init_args"] = {
        "from_config": {
            "vocab_size": 30522,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
        },
        "tokenizer_name_or_path": "all-MiniLM-L6-v2",
    }
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
