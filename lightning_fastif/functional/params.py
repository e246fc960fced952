"""Parameter selection, flattening, and the influence mode a model runs in.

Every influence computation differentiates only the *selected* parameters. Selection never flips
``requires_grad`` on the caller's model: the selected tensors are passed explicitly to
``torch.func.functional_call`` and every other parameter enters detached.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ParameterSpec = Sequence[str] | Sequence[nn.Parameter] | None


@dataclass(frozen=True)
class ParameterSelection:
    """The parameters an influence computation differentiates, in model order.

    Attributes:
        names: Qualified parameter names, as ``model.named_parameters()`` gives them.
        shapes: The shape of each selected parameter.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def numel(self) -> int:
        """Total number of selected scalars, the length of every flat gradient."""
        return sum(shape.numel() for shape in self.shapes)

    def tensors(self, model: nn.Module) -> tuple[Tensor, ...]:
        """Return the model's current values of the selected parameters, detached."""
        named = dict(model.named_parameters())
        return tuple(named[name].detach() for name in self.names)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into one flat vector ``[P]``."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def flatten_batched(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors with a leading batch dim into ``[B, P]``."""
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)

    def unflatten(self, flat: Tensor) -> tuple[Tensor, ...]:
        """Split a flat vector ``[P]`` back into tensors of the selected shapes."""
        if flat.shape != (self.numel,):
            raise ValueError(f"Expected a flat vector of shape ({self.numel},), but got {tuple(flat.shape)}.")
        sizes = [shape.numel() for shape in self.shapes]
        return tuple(chunk.view(shape) for chunk, shape in zip(flat.split(sizes), self.shapes, strict=True))

    def unflatten_batched(self, flat: Tensor) -> tuple[Tensor, ...]:
        """Split rows ``[B, P]`` into tensors of the selected shapes with a leading batch dim ``B``."""
        if flat.dim() != 2 or flat.shape[1] != self.numel:
            raise ValueError(f"Expected rows of shape (B, {self.numel}), but got {tuple(flat.shape)}.")
        sizes = [shape.numel() for shape in self.shapes]
        rows = flat.shape[0]
        return tuple(
            chunk.reshape(rows, *shape) for chunk, shape in zip(flat.split(sizes, dim=1), self.shapes, strict=True)
        )


def select_parameters(model: nn.Module, parameters: ParameterSpec = None) -> ParameterSelection:
    """Choose the parameters to differentiate.

    Args:
        model: The module whose parameters are selected.
        parameters: ``None`` selects every parameter with ``requires_grad``. A sequence of strings selects
            the parameters whose qualified name matches any of them as a regular expression
            (``re.search``), for example ``[r"encoder\\.layer\\.(4|5)\\.", "pooler", "classifier"]``.
            A sequence of ``nn.Parameter`` objects selects exactly those. In every case parameters with
            ``requires_grad=False`` are left out, so frozen parameters never get a gradient.

    Raises:
        ValueError: If a pattern matches no parameter, a given parameter is not part of the model, or
            no selected parameter requires grad.
    """
    named = list(model.named_parameters())
    if parameters is None:
        chosen = [name for name, p in named if p.requires_grad]
    elif all(isinstance(item, str) for item in parameters):
        chosen = _match_patterns(named, [str(item) for item in parameters])
    elif all(isinstance(item, Tensor) for item in parameters):
        chosen = _match_tensors(named, [item for item in parameters if isinstance(item, Tensor)])
    else:
        raise TypeError("`parameters` must be None, a sequence of name patterns or a sequence of nn.Parameter.")
    if not chosen:
        raise ValueError(
            "No selected parameter requires grad, so there is nothing to differentiate. "
            "Unfreeze some parameters or select others with `parameters=`."
        )
    by_name = dict(named)
    return ParameterSelection(tuple(chosen), tuple(by_name[name].shape for name in chosen))


def _match_patterns(named: list[tuple[str, nn.Parameter]], patterns: list[str]) -> list[str]:
    if not patterns:
        raise ValueError("`parameters` is an empty list. Pass None to select every trainable parameter.")
    for pattern in patterns:
        if not any(re.search(pattern, name) for name, _ in named):
            examples = ", ".join(name for name, _ in named[:5])
            raise ValueError(
                f"The parameter pattern {pattern!r} matches no parameter name of the model. "
                f"Names look like: {examples}."
            )
    return [name for name, p in named if p.requires_grad and any(re.search(pat, name) for pat in patterns)]


def _match_tensors(named: list[tuple[str, nn.Parameter]], tensors: list[Tensor]) -> list[str]:
    wanted = {id(t) for t in tensors}
    found = {id(p) for _, p in named}
    missing = [t for t in tensors if id(t) not in found]
    if missing:
        raise ValueError(f"{len(missing)} of the given parameters are not parameters of the model.")
    return [name for name, p in named if id(p) in wanted and p.requires_grad]


@contextlib.contextmanager
def influence_mode(model: nn.Module) -> Iterator[None]:
    """Run the model in eval mode (dropout off, batch-norm statistics frozen), then restore each module's mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
