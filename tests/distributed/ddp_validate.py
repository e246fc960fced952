"""Run InfluenceCallback in ``trainer.validate`` on CPU with a given number of processes.

Usage: ``python ddp_validate.py OUT_DIR DEVICES``. With DEVICES=2 Lightning's DDP strategy starts the
second process itself (gloo on CPU); the callback splits the LiSSA repeats and candidates across both.
"""

import atexit
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import lightning_fastif.fastif as fastif  # noqa: E402
from lightning_fastif import InfluenceComputer, LiSSASolver  # noqa: E402
from lightning_fastif.callbacks.influence import InfluenceCallback  # noqa: E402
from lightning_fastif.knn import compute_features  # noqa: E402
from tests.helpers.lightning import TinyClassifier, TokenDataModule  # noqa: E402


def record_work(out_dir: str) -> None:
    """Count the LiSSA repeats, candidates and feature rows each rank handles, in ``work_rank<R>.json`` at exit."""
    work = {"repeats": 0, "scored": 0, "feature_rows": 0}
    one_repeat = LiSSASolver._one_repeat
    score_positions = InfluenceComputer._score_positions

    def record_repeat(self, *args, **kwargs):
        work["repeats"] += 1
        return one_repeat(self, *args, **kwargs)

    def record_scoring(self, ihvps, positions, *, progress):
        work["scored"] += len(positions)
        return score_positions(self, ihvps, positions, progress=progress)

    def record_features(*args, **kwargs):
        features, indices = compute_features(*args, **kwargs)
        work["feature_rows"] += features.shape[0]
        return features, indices

    LiSSASolver._one_repeat = record_repeat
    InfluenceComputer._score_positions = record_scoring
    fastif.compute_features = record_features
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    atexit.register(lambda: Path(out_dir, f"work_rank{rank}.json").write_text(json.dumps(work)))


def main(out_dir: str, devices: int) -> None:
    record_work(out_dir)
    pl.seed_everything(0)
    callback = InfluenceCallback(
        k=20,
        top_k=4,
        depth=10,
        repeats=4,
        scale=100.0,
        lissa_batch_size=4,
        max_queries=16,
        progress=False,
        output_dir=out_dir,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(TinyClassifier(), TokenDataModule(val_size=16, batch_size=4))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
