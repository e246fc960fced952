"""Tiny NLI files, a tiny tokenizer and a tiny BERT config for the NLI tests."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from transformers import BertTokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a cat dog doctor lawyer artist judge sat ran saw helped believed near park on mat in house "
    "is was not and who . , some people animals slept happily quickly"
).split()
VOCAB = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}

MNLI_ROWS = [
    {"premise": "the cat sat on the mat .", "hypothesis": "a cat sat .", "label": "entailment"},
    {"premise": "the dog ran in the park .", "hypothesis": "the dog was happily in the house .", "label": "neutral"},
    {"premise": "the doctor slept .", "hypothesis": "the doctor was not sleeping .", "label": "contradiction"},
    {"premise": "some people saw the judge .", "hypothesis": "people saw a judge .", "label": "entailment"},
    {"premise": "the lawyer helped the artist .", "hypothesis": "the artist is a doctor .", "label": "neutral"},
    {"premise": "the animals slept near the house .", "hypothesis": "the animals ran .", "label": "contradiction"},
]

# Two rows for each (heuristic, gold label) pair of HANS, with HANS's fields.
HANS_ROWS = [
    {"premise": p, "hypothesis": h, "label": label, "heuristic": heuristic, "subcase": subcase, "template": "temp1"}
    for p, h, label, heuristic, subcase in [
        ("the doctor saw the lawyer .", "the lawyer saw the doctor .", "non-entailment", "lexical_overlap", "ln_swap"),
        ("the judge helped the cat .", "the cat helped the judge .", "non-entailment", "lexical_overlap", "ln_swap"),
        ("the doctor and the lawyer ran .", "the lawyer ran .", "entailment", "lexical_overlap", "le_conjunction"),
        ("the judge and the cat slept .", "the cat slept .", "entailment", "lexical_overlap", "le_conjunction"),
        ("the doctor near the lawyer ran .", "the lawyer ran .", "non-entailment", "subsequence", "sn_pp"),
        ("the judge near the artist slept .", "the artist slept .", "non-entailment", "subsequence", "sn_pp"),
        ("the doctor who saw the lawyer ran .", "the doctor ran .", "entailment", "subsequence", "se_relative"),
        ("the judge who helped the cat slept .", "the judge slept .", "entailment", "subsequence", "se_relative"),
        ("the doctor believed the lawyer ran .", "the lawyer ran .", "non-entailment", "constituent", "cn_embedded"),
        ("the judge believed the cat slept .", "the cat slept .", "non-entailment", "constituent", "cn_embedded"),
        ("the doctor saw that the lawyer ran .", "the lawyer ran .", "entailment", "constituent", "ce_embedded"),
        ("the judge saw that the cat slept .", "the cat slept .", "entailment", "constituent", "ce_embedded"),
    ]
]

TINY_BERT_CONFIG: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": len(VOCAB),
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def write_jsonl(path: Path, rows: list[dict[str, Any]], compress: bool = False) -> Path:
    """Write rows as JSON Lines, gzip-compressed when ``compress`` is set."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a saved word-level BERT tokenizer over ``VOCAB``."""
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    BertTokenizer(vocab=dict(VOCAB)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    return BertTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def nli_files(tmp_path: Path) -> dict[str, Path]:
    """Tiny MNLI train/validation and HANS validation files under ``tmp_path``."""
    return {
        "train": write_jsonl(tmp_path / "mnli_train.jsonl", MNLI_ROWS + MNLI_ROWS),
        "mnli_val": write_jsonl(tmp_path / "mnli_val.jsonl.gz", MNLI_ROWS, compress=True),
        "hans_val": write_jsonl(tmp_path / "hans_val.jsonl", HANS_ROWS),
    }
