"""Lightning callbacks that run FastIF during and after training."""

from lightning_fastif.callbacks.influence import InfluenceCallback
from lightning_fastif.callbacks.repair import DataRepairCallback

__all__ = [
    "DataRepairCallback",
    "InfluenceCallback",
]
