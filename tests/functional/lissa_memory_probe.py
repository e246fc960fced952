"""Run LiSSA on a small MLP at a given depth and print the process's peak RSS in KiB.

Started in a fresh process by the memory test, so each depth's peak is measured on its own.
"""

import resource
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif import LiSSASolver
from lightning_fastif.functional import FunctionalLoss, TrainingSet, influence_mode, select_parameters


def main(depth: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(256, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 1))
    x, y = torch.randn(512, 256), torch.randn(512)
    loss = FunctionalLoss(model, lambda m, b: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean(), select_parameters(model))
    vector = torch.randn(1, loss.selection.numel)
    with influence_mode(model):
        LiSSASolver(depth=depth, scale=1e3, damping=1e-3, batch_size=64).solve(
            loss, TrainingSet(TensorDataset(x, y)), vector
        )
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


if __name__ == "__main__":
    main(int(sys.argv[1]))
