"""Losses as functions of the selected parameters, per-example gradients and Hessian-vector products."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from lightning_fastif.functional.batches import LossFn, batch_size_of, check_finite, checked_loss, slice_batch
from lightning_fastif.functional.params import ParameterSelection

log = logging.getLogger(__name__)

Vectorize = Literal["auto", "vmap", "loop"]

# Up to this many differentiated parameters, hvps runs one batched second backward pass for all rows.
# NOTE: the limit comes from one MLP on one CPU (benchmarks/batched_hvps.py, 4 rows, batch 16, one thread).
# There the batched pass took 0.6 to 0.8 of the time of a pass per row up to about 44,000 parameters, and as
# long or longer from 75,000 on. On MiniLM (3.7M parameters) it was slower too. GPUs were not measured.
BATCHED_HVPS_MAX_PARAMETERS = 32_768


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class FunctionalLoss:
    """The user's mean batch loss as a function of the selected parameters, plus an optional L2 term.

    The objective is ``loss_fn(model, batch) + weight_decay * ||theta||^2`` over the selected parameters.
    The L2 term always enters Hessian-vector products. It enters gradients only when
    ``weight_decay_in_gradients`` is true, as FastIF's reference code does; that shifts every score towards
    "helpful", so it is off by default.

    Args:
        model: The model. Its parameters are never modified.
        loss_fn: ``loss_fn(model, batch)`` returning the mean loss over the batch as a scalar.
        selection: The parameters to differentiate.
        weight_decay: Coefficient of ``||theta||^2`` in the training objective.
        weight_decay_in_gradients: Add the L2 gradient ``2 * weight_decay * theta`` to every gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        selection: ParameterSelection,
        *,
        weight_decay: float = 0.0,
        weight_decay_in_gradients: bool = False,
    ) -> None:
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, but got {weight_decay}.")
        self.model = model
        self.selection = selection
        self.weight_decay = weight_decay
        self.weight_decay_in_gradients = weight_decay_in_gradients
        self._module = _LossModule(model, loss_fn)
        self._selected = set(selection.names)
        self._batched_hvps = True

    @property
    def batches_hvps(self) -> bool:
        """True when :meth:`hvps` runs one batched second backward pass for all rows.

        True up to ``BATCHED_HVPS_MAX_PARAMETERS`` differentiated parameters, until a batched pass has failed
        on this model.
        """
        return self._batched_hvps and self.selection.numel <= BATCHED_HVPS_MAX_PARAMETERS

    def params(self) -> tuple[Tensor, ...]:
        """Return the current values of the selected parameters, detached."""
        return self.selection.tensors(self.model)

    def loss(self, params: tuple[Tensor, ...], batch: Any) -> Tensor:
        """Return the user's mean loss over ``batch`` at ``params`` (no L2 term)."""
        mapping = {f"model.{name}": p for name, p in zip(self.selection.names, params, strict=True)}
        # Every other parameter enters detached, so no graph is built through frozen weights.
        mapping.update(
            {f"model.{name}": p.detach() for name, p in self.model.named_parameters() if name not in self._selected}
        )
        return checked_loss(functional_call(self._module, mapping, (batch,)), where="on a batch")

    def l2(self, params: tuple[Tensor, ...]) -> Tensor:
        return self.weight_decay * torch.stack([(p * p).sum() for p in params]).sum()

    def gradient(self, batch: Any) -> Tensor:
        """Return the flat gradient ``[P]`` of the mean loss over ``batch``."""
        params = tuple(p.requires_grad_(True) for p in (t.clone() for t in self.params()))
        loss = self.loss(params, batch)
        check_finite(loss, where="on the query batch")
        grads = torch.autograd.grad(loss, params)
        flat = self.selection.flatten(grads)
        if self.weight_decay_in_gradients and self.weight_decay:
            flat = flat + 2 * self.weight_decay * self.selection.flatten(self.params())
        return flat

    def per_example_gradients(
        self, batch: Any, *, vectorize: Vectorize = "auto", examples: str = "training examples"
    ) -> Tensor:
        """Return the flat gradient of each example's loss, shape ``[B, P]``.

        ``vectorize="vmap"`` uses ``torch.func.vmap`` over ``torch.func.grad``; ``"loop"`` differentiates one
        example at a time; ``"auto"`` tries vmap and falls back to the loop (once, with a log message) for
        models that vmap cannot handle. ``examples`` names the batch's examples in the error on NaN or inf.
        """
        size = batch_size_of(batch)
        if vectorize == "loop":
            grads = self._per_example_loop(batch, size)
        elif vectorize == "vmap":
            grads = self._per_example_vmap(batch)
        elif vectorize == "auto":
            try:
                grads = self._per_example_vmap(batch)
            except (RuntimeError, NotImplementedError, TypeError) as err:
                log.info("vmap failed on this model (%s); computing per-example gradients in a loop.", err)
                grads = self._per_example_loop(batch, size)
        else:
            raise ValueError(f"`vectorize` must be 'auto', 'vmap' or 'loop', but got {vectorize!r}.")
        if not torch.isfinite(grads).all():
            raise ValueError(f"Per-example gradients contain NaN or inf. Check the loss of the {examples}.")
        if self.weight_decay_in_gradients and self.weight_decay:
            grads = grads + 2 * self.weight_decay * self.selection.flatten(self.params())
        return grads

    def per_example_directional_derivatives(self, batch: Any, vectors: Tensor) -> Tensor:
        """Return ``vectors[q] . grad L_i`` for each example ``i`` and vector ``q``, shape ``[B, Q]``.

        Forward-mode ``torch.func.jvp`` under ``vmap`` computes each product without building the ``[B, P]``
        per-example gradients of :meth:`per_example_gradients`. It costs one forward pass per vector, so it
        pays off for few vectors.
        """
        params = self.params()
        in_dims = _example_dims(batch)
        columns = []
        for vector in vectors:
            pieces = self.selection.unflatten(vector)
            tangent = tuple(piece.to(param.dtype) for piece, param in zip(pieces, params, strict=True))

            def derivative(example: Any, tangent: tuple[Tensor, ...] = tangent) -> Tensor:
                return jvp(lambda weights: self._single_loss(weights, example), (params,), (tangent,))[1]

            column = vmap(derivative, in_dims=(in_dims,), randomness="different")(batch)
            if self.weight_decay_in_gradients and self.weight_decay:
                column = column + 2 * self.weight_decay * (self.selection.flatten(params) @ vector.to(column.dtype))
            columns.append(column)
        products = torch.stack(columns, dim=1)
        if not torch.isfinite(products).all():
            raise ValueError(
                "Per-example directional derivatives contain NaN or inf. Check the loss of the training examples."
            )
        return products

    def _single_loss(self, params: tuple[Tensor, ...], example: Any) -> Tensor:
        """Return the loss of one example, given without its batch dimension as ``vmap`` passes it."""
        one = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)
        return self.loss(params, one)

    def _per_example_vmap(self, batch: Any) -> Tensor:
        grads = vmap(grad(self._single_loss), in_dims=(None, _example_dims(batch)), randomness="different")(
            self.params(), batch
        )
        return self.selection.flatten_batched(grads)

    def _per_example_loop(self, batch: Any, size: int) -> Tensor:
        rows = []
        for i in range(size):
            params = tuple(t.clone().requires_grad_(True) for t in self.params())
            loss = self.loss(params, slice_batch(batch, i, i + 1))
            rows.append(self.selection.flatten(torch.autograd.grad(loss, params)))
        return torch.stack(rows)

    def hvp(self, batch: Any, vector: Tensor) -> Tensor:
        """Return ``H v`` (flat ``[P]``) for the Hessian of the mean loss over ``batch`` plus the L2 term.

        The graph is freed before returning, so repeated calls keep memory flat.
        """
        return self.hvps(batch, vector.unsqueeze(0))[0]

    def hvps(self, batch: Any, vectors: Tensor) -> Tensor:
        """Return ``H v`` for each row of ``vectors`` (``[Q, P]``), shape ``[Q, P]``, as :meth:`hvp` does.

        The loss and its first-order gradient are computed once for all rows. Up to
        ``BATCHED_HVPS_MAX_PARAMETERS`` parameters the second backward pass runs once for all rows, batched
        over them (``is_grads_batched``), because on small models a pass costs mostly its fixed overhead;
        larger models, and models whose backward pass cannot be batched (after a log message), get one
        second backward pass per row.
        """
        if len(vectors) == 0:
            return torch.zeros_like(vectors)
        params = tuple(t.clone().requires_grad_(True) for t in self.params())
        loss = self.loss(params, batch)
        check_finite(loss, where="on a training batch")
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vectors_in_dtype = vectors.to(dtype=params[0].dtype)
        flat = None
        if len(vectors) > 1 and self.batches_hvps:
            try:
                flat = self._batched_second_backward(grads, params, vectors_in_dtype)
            except (RuntimeError, NotImplementedError) as err:
                log.info("Batched Hessian-vector products failed (%s), so each row gets its own pass.", err)
                self._batched_hvps = False
        if flat is None:
            rows = []
            for row, vector in enumerate(vectors_in_dtype):
                last = row == len(vectors) - 1
                pieces = self.selection.unflatten(vector)
                product = torch.autograd.grad(
                    grads, params, grad_outputs=pieces, retain_graph=not last, allow_unused=True
                )
                rows.append(self.selection.flatten(self._zeros_for_unused(product, params)).detach())
            flat = torch.stack(rows)
        if self.weight_decay:
            flat = flat + 2 * self.weight_decay * vectors
        return flat

    def _batched_second_backward(
        self, grads: tuple[Tensor, ...], params: tuple[Tensor, ...], vectors: Tensor
    ) -> Tensor:
        pieces = self.selection.unflatten_batched(vectors)
        product = torch.autograd.grad(
            grads, params, grad_outputs=pieces, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        filled = self._zeros_for_unused(product, params, rows=len(vectors))
        return self.selection.flatten_batched(filled).detach()

    @staticmethod
    def _zeros_for_unused(
        product: tuple[Tensor | None, ...], params: tuple[Tensor, ...], *, rows: int | None = None
    ) -> tuple[Tensor, ...]:
        """Replace the ``None`` products of parameters outside the graph with zeros, ``[rows, ...]`` if given."""
        leading = () if rows is None else (rows,)
        return tuple(
            p.new_zeros((*leading, *p.shape)) if h is None else h for h, p in zip(product, params, strict=True)
        )

    def hessian(self, batch: Any, *, chunk_size: int = 256) -> Tensor:
        """Return the explicit Hessian ``[P, P]`` of the mean loss over ``batch`` (no L2 term)."""
        params = tuple(t.clone().requires_grad_(True) for t in self.params())
        loss = self.loss(params, batch)
        check_finite(loss, where="on a training batch")
        grads = self.selection.flatten(torch.autograd.grad(loss, params, create_graph=True))
        numel = grads.numel()
        rows = []
        eye = torch.eye(numel, dtype=grads.dtype, device=grads.device)
        for start in range(0, numel, chunk_size):
            basis = eye[start : start + chunk_size]
            chunk = torch.autograd.grad(
                grads, params, grad_outputs=basis, is_grads_batched=True, retain_graph=True, allow_unused=True
            )
            chunk = tuple(
                torch.zeros(basis.shape[0], *p.shape, dtype=p.dtype, device=p.device) if c is None else c
                for c, p in zip(chunk, params, strict=True)
            )
            rows.append(self.selection.flatten_batched(chunk).detach())
        return torch.cat(rows)


def mean_over_batches(values: Iterable[tuple[Tensor, int]]) -> Tensor:
    """Average per-batch results weighted by batch size, so the result is the mean over all examples."""
    total: Tensor | None = None
    count = 0
    for value, size in values:
        total = value * size if total is None else total + value * size
        count += size
    if total is None:
        raise ValueError("No batches to average over: the training set is empty.")
    return total / count


def _example_dims(batch: Any) -> Any:
    """Return ``vmap``'s ``in_dims`` for a batch: dimension 0 of every tensor, None for other leaves."""
    return torch.utils._pytree.tree_map(lambda t: 0 if isinstance(t, Tensor) else None, batch)
