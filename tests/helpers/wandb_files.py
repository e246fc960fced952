"""Read back what an offline W&B run wrote: history rows from the .wandb file and table JSON files.

The .wandb file is a LevelDB-style log (W&B's ``datastore`` format): a 7-byte file header, then 32 KiB
blocks of records, each with a 7-byte header (crc32c, little-endian length, type) and a piece of a
serialised ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK_SIZE = 32768
FILE_HEADER_SIZE = 7
RECORD_HEADER_SIZE = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    records = []
    pending = b""
    offset = FILE_HEADER_SIZE
    while offset + RECORD_HEADER_SIZE <= len(data):
        block_left = BLOCK_SIZE - offset % BLOCK_SIZE
        if block_left < RECORD_HEADER_SIZE:
            offset += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + RECORD_HEADER_SIZE])
        offset += RECORD_HEADER_SIZE
        piece = data[offset : offset + length]
        offset += length
        if kind == 0 and length == 0:
            break
        pending = piece if kind in (FULL, FIRST) else pending + piece
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(run_dir: Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """Return the records of an offline run once its closing ``exit`` record is on disk.

    ``wandb.finish()`` can return before W&B's background service has written the whole file (seen with
    wandb 0.31), so this polls until the ``exit`` record, the last one a run writes, is there.
    """
    deadline = time.monotonic() + timeout
    while True:
        files = list(run_dir.glob("run-*.wandb"))
        records = read_records(files[0]) if len(files) == 1 else []
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"The offline W&B run in {run_dir} wrote no exit record within {timeout} s.")
        time.sleep(0.2)


def history_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Return every history row (one ``run.log`` call) of an offline run as a dict of decoded values."""
    rows = []
    for record in finished_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def tables(run_dir: Path, key: str) -> list[dict[str, Any]]:
    """Return the table JSON files logged under ``key`` (for example "influence/top_examples"), oldest first."""
    folder, _, name = key.rpartition("/")
    files = sorted((run_dir / "files" / "media" / "table" / folder).glob(f"{name}_*.table.json"), key=_step_of)
    return [json.loads(path.read_text()) for path in files]


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[-2])


def offline_run_dir(save_dir: Path) -> Path:
    (run_dir,) = (save_dir / "wandb").glob("offline-run-*")
    return run_dir
