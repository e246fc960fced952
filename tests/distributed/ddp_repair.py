"""Run DataRepairCallback after a fit without training steps, on CPU with a given number of processes.

Usage: ``python ddp_repair.py WEIGHTS OUT_DIR DEVICES``. WEIGHTS is a state dict of the spurious-feature
MLP of ``tests/callbacks/test_repair.py``. With DEVICES=2 Lightning's DDP strategy starts the second
process itself (gloo on CPU), and the callback splits the LiSSA repeats and candidates across both.
Rank zero writes ``final.pt``, the repaired weights.
"""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lightning_fastif.callbacks import DataRepairCallback  # noqa: E402
from tests.callbacks.test_repair import FAST_LISSA, REPAIR_LR, SpuriousMLP, make_task  # noqa: E402
from tests.distributed.ddp_validate import record_work  # noqa: E402


def main(weights: str, out_dir: str, devices: int) -> None:
    record_work(out_dir)
    torch.set_num_threads(1)
    pl.seed_everything(0)
    task = make_task()
    model = SpuriousMLP()
    model.load_state_dict(torch.load(weights))
    callback = DataRepairCallback(
        target_dataset=task.target,
        pool_dataset=task.pool,
        source_dataset=task.source,
        strategies=["helpful", "random"],
        num_steps=2,
        lr=REPAIR_LR,
        repeats=2,
        policy="keep",
        output_dir=out_dir,
        progress=False,
        **FAST_LISSA,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        limit_train_batches=0,
        logger=False,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(task.train, batch_size=32))
    if trainer.is_global_zero:
        torch.save(model.state_dict(), Path(out_dir) / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
