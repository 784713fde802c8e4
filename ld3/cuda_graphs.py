"""Whole-solve CUDA graphs: replay an N-step solve (and its backward pass) as one graph launch each.

At the batch sizes LD3 trains with (1-2 samples) a pixel UNet's forward pass is a few hundred tiny
kernels, so an eager solve is bound by the Python and launch overhead of the host, not by the GPU.
:class:`GraphedSolver` wraps any solver of ``ld3.solvers`` (same call signature) and, per input
signature, captures the whole solve once with ``torch.cuda.graph``: the N denoiser calls, the solver's
arithmetic and, when gradients are needed, the backward pass (``torch.autograd.grad`` captured into a
second graph, as ``torch.cuda.make_graphed_callables`` does for one module). Later calls copy the
inputs into the graph's static buffers and replay; the kernels are the eager ones, so results equal
the eager solve's up to the nondeterminism of the kernels themselves.

Rules of use (what the replay cannot see):
- The denoiser must be a fixed function of its inputs: its weights, dtype, device and options
  (``autocast_bf16``, ``gradient_checkpointing``) are baked into the graph at capture. After changing
  any of them call :meth:`GraphedSolver.clear`.
- The denoiser and solver must not synchronise with the host inside the solve (``.item()``, ``bool`` of a
  tensor, copies from CPU memory); ``ld3`` solvers skip their value checks while a graph is captured,
  and the first (eager warm-up) call of each signature still runs them.
- A graphed solve with gradients must be backpropagated before the same signature is solved again with
  gradients (the saved activations live in the graph's static memory); a violation raises at backward.
Inputs that are not all CUDA tensors (or a non-tensor ``cond``) run the wrapped solver eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor

from ld3.solvers.base import Denoiser, Solver

WARMUP_CALLS = 2  # eager calls on a side stream before capture (lazy initialisation, cuDNN/cuBLAS handles)


class _CapturedSolve:
    """The captured graphs of one input signature: a forward graph, and a backward graph if gradients flow."""

    def __init__(self, run: Callable[..., Tensor], inputs: list[Tensor], needs_grad: list[bool]):
        self.static_inputs = [t.detach().clone().requires_grad_(g) for t, g in zip(inputs, needs_grad, strict=True)]
        self.needs_grad = needs_grad
        self.differentiable = any(needs_grad)
        self.generation = 0  # forward replays so far; a backward must belong to the latest one
        wrt = [t for t, g in zip(self.static_inputs, needs_grad) if g]
        self._warm_up(run, wrt)
        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph):
            self.static_output = run(*self.static_inputs)
        if not self.differentiable:
            return
        self.static_grad_output = torch.empty_like(self.static_output)
        self.backward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.backward_graph, pool=self.forward_graph.pool()):
            grads = torch.autograd.grad(self.static_output, wrt, self.static_grad_output, allow_unused=True)
        grads_iter = iter(grads)
        self.static_grads = [next(grads_iter) if g else None for g in needs_grad]

    def _warm_up(self, run: Callable[..., Tensor], wrt: list[Tensor]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                out = run(*self.static_inputs)
                if self.differentiable:
                    torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)
        torch.cuda.current_stream().wait_stream(side)

    def load(self, inputs: tuple[Tensor, ...]) -> None:
        with torch.no_grad():
            for static, value in zip(self.static_inputs, inputs, strict=True):
                static.copy_(value)

    def replay_forward(self) -> Tensor:
        self.forward_graph.replay()
        self.generation += 1
        return self.static_output.detach().clone()


class _ReplayWithGradients(torch.autograd.Function):
    """Autograd node of a captured solve: forward and backward are graph replays."""

    @staticmethod
    def forward(ctx: Any, captured: _CapturedSolve, *inputs: Tensor) -> Tensor:
        captured.load(inputs)
        ctx.captured = captured
        output = captured.replay_forward()
        ctx.generation = captured.generation
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        captured: _CapturedSolve = ctx.captured
        if ctx.generation != captured.generation:
            raise RuntimeError(
                "a graphed solve was run again with gradients before the backward pass of an earlier one; its "
                "saved activations are overwritten. Backpropagate each solve before the next, or use the eager solver"
            )
        captured.static_grad_output.copy_(grad_output)
        captured.backward_graph.replay()
        return (None, *(None if g is None else g.clone() for g in captured.static_grads))


class GraphedSolver:
    """``solver(denoiser, x, sigmas, sigmas_eval=None, *, order, cond=None)`` replayed from CUDA graphs.

    A drop-in for the wrapped solver (module docstring for the rules). One capture per signature:
    denoiser, order, shapes, dtypes and device of the inputs, and which of them need gradients.
    """

    def __init__(self, solver: Solver):
        self.solver = solver
        self._captured: dict[Hashable, tuple[Denoiser, _CapturedSolve]] = {}

    def clear(self) -> None:
        """Drop every captured graph (after the denoiser changed), freeing their memory."""
        self._captured.clear()

    @property
    def num_graphs(self) -> int:
        """Signatures captured so far."""
        return len(self._captured)

    def __call__(
        self,
        denoiser: Denoiser,
        x: Tensor,
        sigmas: Tensor,
        sigmas_eval: Tensor | None = None,
        *,
        order: int,
        cond: Any = None,
    ) -> Tensor:
        if not x.is_cuda or (cond is not None and not (isinstance(cond, Tensor) and cond.is_cuda)):
            return self.solver(denoiser, x, sigmas, sigmas_eval, order=order, cond=cond)
        sigmas = sigmas.to(device=x.device, dtype=x.dtype)  # differentiable; no host copy inside the graph
        inputs = [x, sigmas] + ([] if sigmas_eval is None else [sigmas_eval.to(device=x.device, dtype=x.dtype)])
        n_grid_inputs = len(inputs)
        if cond is not None:
            inputs.append(cond)
        grad_enabled = torch.is_grad_enabled()
        needs_grad = [grad_enabled and t.requires_grad and i < n_grid_inputs for i, t in enumerate(inputs)]
        captured = self._capture(denoiser, order, inputs, needs_grad, sigmas_eval is None, cond is not None)
        if captured.differentiable:
            return _ReplayWithGradients.apply(captured, *inputs)
        captured.load(tuple(inputs))
        return captured.replay_forward()

    def _capture(self, denoiser: Denoiser, order: int, inputs: list[Tensor], needs_grad: list[bool],
                 same_grid: bool, has_cond: bool) -> _CapturedSolve:
        key = (id(denoiser), order, same_grid, has_cond, tuple(needs_grad),
               tuple((tuple(t.shape), t.dtype, t.device) for t in inputs))
        entry = self._captured.get(key)
        if entry is not None:
            return entry[1]

        def run(x: Tensor, sigmas: Tensor, *rest: Tensor) -> Tensor:
            sigmas_eval = None if same_grid else rest[0]
            cond = rest[-1] if has_cond else None
            return self.solver(denoiser, x, sigmas, sigmas_eval, order=order, cond=cond)

        with torch.set_grad_enabled(any(needs_grad)):
            captured = _CapturedSolve(run, inputs, needs_grad)
        self._captured[key] = (denoiser, captured)  # the denoiser is kept alive so its id stays unique
        return captured
