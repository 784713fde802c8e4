"""The LD3 trainer: learn (σ, σ_eval) for one denoiser × solver × order × NFE (docs/method.md#training).

``train_ld3`` distils a high-NFE teacher into a few-step discretisation. Given teacher pairs (z, y), the
student runs ``ŷ = decode(solver(D, σ_max·z', σ, σ_eval))`` from a slack latent ``z'`` in the ball
``‖z' − z‖₂ ≤ r`` and minimises a per-sample distance d(ŷ, y). Per round:

1. every training batch: solve with ``z'`` as a leaf, backpropagate the mean loss, clip, step ξ
   (RMSprop; phase 2 also ξᶜ, SGD), step ``z'`` by SGD and project it onto its ball, keep the new
   ``z'`` only where the per-sample loss went down (accept-if-better), then run a validation check
   (the accept re-solve and the check are one solve, docs/method.md#training);
2. one pass over the validation set updates only the validation latents the same way (no ξ step).

Phase 1 (``rounds_v1`` rounds) trains ξ alone, phase 2 (``rounds_v2``) ξ and ξᶜ, and with
``learn_coefficients`` also the solver's coefficient corrections (Adam, ``lr_coef``). A validation check
evaluates the current schedule on the (slack) validation latents, keeps the best (ξ, ξᶜ), and after
``patience`` non-improving checks reloads the best; the first time this happens the checks switch
from the first validation batch to the whole validation set (no decay), every later time the
learning rates decay (×``lr_decay``, with floors). Training stops when lr2 has sat at its floor
``lr2_floor_hits`` times, after the last round, or when a callback raises ``StopTraining``.

``LD3Bundle`` trains K such trials, each with its own ``LD3Config``, in one batched solve per step: every
trial keeps its own state, the denoiser sees all trials' samples at once, each sample on its own trial's
grid (docs/method.md#batched-trials). ``train_ld3`` is the bundle of one trial.

Deviations from the reference code, each deliberate: the accept-if-better test compares both
latents under the same (pre-step) schedule (``accept_after_step`` gives the reference's rule);
best-state reloads restore (ξ, ξᶜ) but not latents (latents only ever improve); the reference's per-file checkpoints, plots and pickles are callbacks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ld3.baselines import named_grid
from ld3.config import (  # the trainer's knobs (re-exported: ld3.train.LD3Config)
    BUNDLE_SHARED_FIELDS,
    DerivedHyperparameters,
    LD3Config,
)
from ld3.cuda_graphs import GraphedSolver
from ld3.discretizations import LearnableDiscretization
from ld3.losses import LossFn, get_loss
from ld3.sampling import sample_losses, solve_from_latents
from ld3.schedules import NoiseSchedule
from ld3.solvers import coefficient_shape, get_solver, solver_steps_for_nfe
from ld3.solvers import nfe as solver_nfe

Denoiser = Callable[..., Tensor]
Solver = Callable[..., Tensor]


# ---------------------------------------------------------------------------------------------
# Data, events, results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherData:
    """Teacher pairs: latents ``z`` [M, C, H, W] (x_T = σ_max z), targets ``y`` [M, ...], optional ``cond`` [M, ...]."""

    z: Tensor
    y: Tensor
    cond: Tensor | None = None

    def __len__(self) -> int:
        return self.z.shape[0]


@dataclass(frozen=True)
class StepMetrics:
    """What one training step reports to callbacks (losses are batch/sample means of the per-sample loss)."""

    phase: int  # 1: ξ only, 2: ξ and ξᶜ
    round: int
    step: int  # training steps so far, 1-based
    train_loss: float  # this batch, before the step
    val_loss: float  # the validation check after the step
    best_val_loss: float
    lr1: float
    lr2: float
    shift_lr: float
    accepted_fraction: float  # share of this batch's latents whose slack step was kept
    max_slack_distance: float  # max ‖z' − z‖₂ over all train and validation latents (≤ slack radius)
    val_on_all: bool  # whether checks use the whole validation set (else its first batch)
    sigmas: Tensor  # the schedule after the step, float64 CPU
    sigmas_eval: Tensor


@dataclass(frozen=True)
class BestSchedule:
    """A new best schedule found by a validation check."""

    step: int
    val_loss: float
    sigmas: Tensor  # float64 CPU
    sigmas_eval: Tensor
    coefficients: Tensor | None = None  # learned coefficient corrections [N, slots], float64 CPU


class Callback:
    """Receives training events; override either method. A plain function is used as ``on_step``.

    Raise ``StopTraining`` from either method to end training early with the best schedule so far.
    """

    def on_step(self, metrics: StepMetrics) -> None:
        """After every training step and its validation check."""

    def on_best(self, best: BestSchedule) -> None:
        """After a validation check that improved on the best loss."""


class StopTraining(Exception):
    """Raised (e.g. by a callback or an early-stopping scheduler) to end training cleanly."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; carries the last finite best schedule (None if there was none)."""

    def __init__(self, message: str, step: int, best: BestSchedule | None):
        super().__init__(message)
        self.step = step
        self.best = best

    def __reduce__(self):
        """Pickle with all three arguments (the default passes only ``args``), so Ray can rebuild it elsewhere."""
        return type(self), (str(self), self.step, self.best)


@dataclass(frozen=True)
class LD3Result:
    """The learned discretisation and how training went."""

    sigmas: Tensor  # best σ grid, descending, float64 CPU, length N + 1
    sigmas_eval: Tensor  # best denoiser evaluation points (== sigmas when not decoupled)
    best_val_loss: float  # best validation-check loss (slack validation latents)
    final_val_loss: float  # mean loss of the best schedule on the ORIGINAL validation latents
    n_steps: int
    nfe: int | None  # denoiser calls per sample (None for a solver given as a function)
    steps: int  # training steps run
    max_slack_distance: float  # max ‖z' − z‖₂ over all latents at the end (≤ slack radius)
    stop_reason: str  # "completed", "lr2_floor" or "stopped: <message>"
    wall_time_s: float  # training rounds, without the final evaluation
    hyperparameters: DerivedHyperparameters
    history: tuple[StepMetrics, ...] = field(repr=False)
    coefficients: Tensor | None = None  # best coefficient corrections [N, slots] (learn_coefficients), float64 CPU


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def project_to_ball(z_new: Tensor, center: Tensor, radius: float) -> Tensor:
    """Per-sample Euclidean projection of ``z_new`` onto ``{z: ‖z − center‖₂ ≤ radius}`` (docs/method.md, step 3)."""
    delta = z_new - center
    norm = delta.flatten(1).norm(dim=1)
    scale = torch.where(norm > radius, radius / norm, torch.ones_like(norm))
    return center + delta * scale.reshape(-1, *([1] * (delta.ndim - 1)))


def _check_teacher(data: TeacherData, name: str) -> None:
    z, y, cond = data.z, data.y, data.cond
    if not isinstance(z, Tensor) or z.ndim != 4:
        raise ValueError(f"{name}.z must be a latent tensor [M, C, H, W], got {getattr(z, 'shape', type(z).__name__)}")
    if z.shape[0] < 1:
        raise ValueError(f"{name} holds no samples; give at least one teacher pair")
    if not isinstance(y, Tensor) or y.ndim < 2 or y.shape[0] != z.shape[0]:
        raise ValueError(f"{name}.y must hold one target per latent ({z.shape[0]}), got shape {getattr(y, 'shape', None)}")
    if cond is not None and (not isinstance(cond, Tensor) or cond.shape[:1] != z.shape[:1]):
        raise ValueError(f"{name}.cond must be a tensor with one row per latent ({z.shape[0]}), got {getattr(cond, 'shape', cond)}")
    for part, value in (("z", z), ("y", y)):
        if not value.is_floating_point():
            raise ValueError(f"{name}.{part} must be a floating-point tensor, got {value.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}.{part} contains NaN or Inf; regenerate the teacher data")


def _check_inputs(train: TeacherData, val: TeacherData) -> None:
    _check_teacher(train, "train")
    _check_teacher(val, "val")
    if train.z.shape[1:] != val.z.shape[1:] or train.y.shape[1:] != val.y.shape[1:]:
        raise ValueError(
            f"train and val samples differ in shape: z {tuple(train.z.shape[1:])} vs {tuple(val.z.shape[1:])}, "
            f"y {tuple(train.y.shape[1:])} vs {tuple(val.y.shape[1:])}; use teacher data of one model"
        )
    if (train.cond is None) != (val.cond is None):
        raise ValueError("give cond for both train and val, or for neither")


def _resolve_steps(solver: str | Solver, order: int, n_steps: int | None, nfe_budget: int | None) -> tuple[int, int | None]:
    """(N, NFE) from exactly one of n_steps / nfe."""
    if (n_steps is None) == (nfe_budget is None):
        raise ValueError("give exactly one of n_steps= (grid steps) or nfe= (denoiser calls)")
    if nfe_budget is not None:
        if nfe_budget < 1:
            raise ValueError(f"nfe must be >= 1, got {nfe_budget}")
        if not isinstance(solver, str):
            raise ValueError("nfe= needs the solver by name (ld3.solvers.SOLVERS); pass n_steps= for a solver function")
        n_steps = solver_steps_for_nfe(solver, nfe_budget)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    return n_steps, solver_nfe(solver, n_steps, order) if isinstance(solver, str) else None


def _coefficient_shape(solver: str | Solver, order: int, n_steps: int, config: LD3Config) -> tuple[int, int] | None:
    """Shape of the learned coefficient corrections, or None when ``learn_coefficients`` is off."""
    if not config.learn_coefficients:
        return None
    if not isinstance(solver, str):
        raise ValueError("learn_coefficients=True needs the solver by name (ld3.solvers.SOLVERS), not a function")
    return coefficient_shape(solver, n_steps, order)


def _prepare_denoiser(denoiser: Denoiser, config: LD3Config) -> Denoiser:
    """Optionally compile the denoiser and checkpoint each call (activations of one call at a time)."""
    fn = torch.compile(denoiser) if config.compile else denoiser
    if not config.grad_checkpointing:
        return fn

    def checkpointed(x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        if not torch.is_grad_enabled():
            return fn(x, sigma, cond)
        return checkpoint(fn, x, sigma, cond, use_reentrant=False)

    return checkpointed


def _as_callbacks(callbacks: Iterable[Callback | Callable[[StepMetrics], None]]) -> list[Callback]:
    out = []
    for cb in callbacks:
        if isinstance(cb, Callback):
            out.append(cb)
        elif callable(cb):
            out.append(_FunctionCallback(cb))
        else:
            raise ValueError(f"callbacks must be Callback objects or functions of StepMetrics, got {type(cb).__name__}")
    return out


class _FunctionCallback(Callback):
    def __init__(self, fn: Callable[[StepMetrics], None]):
        self.fn = fn

    def on_step(self, metrics: StepMetrics) -> None:
        self.fn(metrics)


# ---------------------------------------------------------------------------------------------
# Bundles: K trials trained in one batched solve
# ---------------------------------------------------------------------------------------------
def check_bundle(configs: Sequence[LD3Config]) -> None:
    """Reject a bundle whose trials differ where they must not (``BUNDLE_SHARED_FIELDS``, docs/method.md#batched-trials)."""
    if not configs or not all(isinstance(c, LD3Config) for c in configs):
        raise ValueError("configs must be a non-empty sequence of LD3Config, one per trial of the bundle")
    for name in BUNDLE_SHARED_FIELDS:
        values = [getattr(c, name) for c in configs]
        if any(v != values[0] for v in values):
            raise ValueError(f"LD3Config.{name} must be the same for every trial of a bundle, got {values}; "
                             "train trials that differ in it in separate bundles")
    if len(configs) > 1 and any(c.learn_coefficients for c in configs):
        raise ValueError("learn_coefficients=True needs a bundle of one trial (the solver takes one set of "
                         "coefficients per solve); train such trials one at a time")


@dataclass(frozen=True)
class RoundReport:
    """One trial's state after a bundle round (``LD3Bundle.run_round``): enough for a scheduler to stop it."""

    trial: int  # index of the trial in the bundle's configs
    round: int
    phase: int
    step: int  # training steps so far
    best_val_loss: float  # best validation-check loss so far (inf before the first check)
    finished: str | None  # None while it trains; else its stop reason, or "diverged"


class _Trial:
    """One trial of a bundle: its schedule, optimisers, slack latents, best state and counters (docs/method.md#training).

    Everything here is exactly what a run of this trial alone keeps; only the solves are shared (``LD3Bundle``).
    """

    def __init__(self, index: int, config: LD3Config, derived: DerivedHyperparameters, callbacks: list[Callback],
                 train: TeacherData, val: TeacherData, n_steps: int, schedule: NoiseSchedule,
                 coef_shape: tuple[int, int] | None):
        self.index, self.config, self.hp, self.callbacks = index, config, derived, callbacks
        device, dtype = train.z.device, train.z.dtype
        self.disc = LearnableDiscretization(n_steps, schedule, mode=config.mode, decoupled=config.decoupled,
                                            win_rate=config.win_rate, device=device,
                                            dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        self.opt1 = torch.optim.RMSprop([self.disc.xi], lr=config.lr1, momentum=config.momentum1)
        self.opt2 = torch.optim.SGD([self.disc.xi_c], lr=derived.lr2)
        # Coefficient corrections (docs/method.md#learned-coefficients): zero, so training starts at the plain solver.
        self.coef = None if coef_shape is None else nn.Parameter(torch.zeros(coef_shape, dtype=self.disc.xi.dtype,
                                                                                device=device))
        self.opt_coef = None if self.coef is None else torch.optim.Adam([self.coef], lr=config.lr_coef)
        self.z_train = train.z.clone()  # slack latents z' (the originals stay in train.z / val.z)
        self.z_val = val.z.clone()
        self.shift_lr = derived.shift_lr
        self.phase = self.round = self.step = 0
        self.val_on_all = False
        self.count_worse = self.lr2_floor_hits = 0
        self.best_state: dict[str, Tensor] = {}
        self.best_coef: Tensor | None = None
        self.best: BestSchedule | None = None
        self.history: list[StepMetrics] = []
        self.generator = torch.Generator().manual_seed(config.seed)
        self.outcome: LD3Result | TrainingDiverged | None = None

    def init_from_prior(self, grid: Tensor) -> None:
        n_steps = self.disc.n_steps
        if grid.shape != (n_steps + 1,):
            raise ValueError(f"LD3Config.init_prior must have N + 1 = {n_steps + 1} values, got {tuple(grid.shape)}")
        self.disc.fit_to(grid.to(self.disc.xi.device))

    def diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"{what} became NaN/Inf at phase {self.phase}, round {self.round}, step {self.step}; "
            "lower lr1/lr2 or check the denoiser and loss for numerical problems", self.step, self.best)

    def require_finite(self, value: Tensor | float, what: str) -> None:
        if not math.isfinite(float(torch.as_tensor(value).detach().sum())):
            raise self.diverged(what)

    def set_trainable(self, phase: int) -> None:
        """Which parameters the training solve differentiates: ξ always, ξᶜ (and coefficients) in phase 2."""
        self.disc.xi.requires_grad_(True)
        self.disc.xi_c.requires_grad_(phase == 2 and self.config.decoupled)
        if self.coef is not None:
            self.coef.requires_grad_(phase == 2)

    def freeze(self) -> None:
        self.disc.requires_grad_(False)
        if self.coef is not None:
            self.coef.requires_grad_(False)

    def changes_coefficients(self) -> bool:
        """Whether ``step_parameters`` is about to move the coefficient corrections (phase 2, ``learn_coefficients``)."""
        return self.coef is not None and self.coef.grad is not None

    def step_parameters(self) -> None:
        """Clip each gradient and step its optimiser (RMSprop on ξ, SGD on ξᶜ, Adam on coefficients)."""
        groups = [(self.disc.xi, self.opt1, self.config.grad_clip), (self.disc.xi_c, self.opt2, self.config.grad_clip)]
        if self.coef is not None:
            groups.append((self.coef, self.opt_coef, self.config.coef_clip))
        for param, opt, clip in groups:
            if param.grad is not None:
                torch.nn.utils.clip_grad_norm_(param, clip)
                opt.step()
                opt.zero_grad(set_to_none=True)

    def max_slack_distance(self, train: TeacherData, val: TeacherData) -> Tensor:
        """max ‖z' − z‖₂ over all train and validation latents, a device scalar."""
        distances = [(slack - data.z).flatten(1).norm(dim=1).max() for slack, data in
                     ((self.z_train, train), (self.z_val, val))]
        return torch.stack(distances).max()

    def check_count(self, n_val: int) -> int:
        """Samples a validation check uses: the first validation batch, or all once ``val_on_all``."""
        return n_val if self.val_on_all else min(n_val, self.config.val_batch_size)

    # ---- best state, patience ----------------------------------------------------------------------
    def check(self, loss: float, sigmas: Tensor, sigmas_eval: Tensor, rescore: Callable[[], float]) -> None:
        """Validation check: track the best state; after ``patience`` misses reload it (and decay).
        ``rescore()`` gives the current schedule's check loss (used once, when the checks widen)."""
        self.require_finite(loss, "the validation loss")
        if self.best is None or loss < self.best.val_loss:
            self.save_best(loss, sigmas, sigmas_eval)
        else:
            self.count_worse += 1
            if self.count_worse >= self.config.patience:
                self._reload_best_and_decay(rescore)

    def save_best(self, loss: float, sigmas: Tensor, sigmas_eval: Tensor) -> None:
        self.best_state = {k: v.detach().clone() for k, v in self.disc.state_dict().items()}
        self.best_coef = None if self.coef is None else self.coef.detach().clone()
        self.best = BestSchedule(self.step, loss, sigmas, sigmas_eval, self.host_coefficients())
        self.count_worse = 0
        for cb in self.callbacks:
            cb.on_best(self.best)

    def reload_best(self) -> None:
        self.disc.load_state_dict(self.best_state)
        if self.coef is not None:
            with torch.no_grad():
                self.coef.copy_(self.best_coef)
        self.count_worse = 0

    def host_coefficients(self) -> Tensor | None:
        """The current coefficient corrections as float64 CPU (one host copy), or None."""
        return None if self.coef is None else self.coef.detach().to("cpu", torch.float64).clone()

    def _reload_best_and_decay(self, rescore: Callable[[], float]) -> None:
        self.reload_best()
        if not self.val_on_all:  # first time: widen the checks to the whole set, re-baseline, no decay
            self.val_on_all = True
            loss = rescore()
            self.require_finite(loss, "the validation loss")
            self.best = replace(self.best, val_loss=loss)
            return
        cfg = self.config
        group1, group2 = self.opt1.param_groups[0], self.opt2.param_groups[0]
        group1["lr"] = max(cfg.lr_decay * group1["lr"], cfg.lr1_floor)
        if self.phase == 2:
            group2["lr"] = max(cfg.lr_decay * group2["lr"], cfg.lr2_floor)
            if self.opt_coef is not None:
                self.opt_coef.param_groups[0]["lr"] *= cfg.lr_decay
            if group2["lr"] <= cfg.lr2_floor:
                self.lr2_floor_hits += 1

    def emit_step(self, train_loss: float, val_loss: float, accepted: float, slack_distance: float,
                  sigmas: Tensor, sigmas_eval: Tensor) -> None:
        metrics = StepMetrics(
            phase=self.phase, round=self.round, step=self.step, train_loss=train_loss, val_loss=val_loss,
            best_val_loss=self.best.val_loss, lr1=self.opt1.param_groups[0]["lr"], lr2=self.opt2.param_groups[0]["lr"],
            shift_lr=self.shift_lr, accepted_fraction=accepted, max_slack_distance=slack_distance,
            val_on_all=self.val_on_all, sigmas=sigmas, sigmas_eval=sigmas_eval,
        )
        self.history.append(metrics)
        for cb in self.callbacks:
            cb.on_step(metrics)

    def report(self) -> RoundReport:
        finished = None
        if isinstance(self.outcome, LD3Result):
            finished = self.outcome.stop_reason
        elif self.outcome is not None:
            finished = "diverged"
        return RoundReport(self.index, self.round, self.phase, self.step,
                           math.inf if self.best is None else self.best.val_loss, finished)


def _per_sample_grids(grids: Sequence[tuple[Tensor, Tensor]], sizes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """One (σ, σ_eval) for every group as it is; different ones as one grid per sample [Σ sizes, N+1] (ld3.solvers.base)."""
    if all(g is grids[0] for g in grids):
        return grids[0]
    expand = lambda part: torch.cat([g[part].expand(n, -1) for g, n in zip(grids, sizes, strict=True)])  # noqa: E731
    return expand(0), expand(1)


def _cat(parts: Sequence[Tensor | None]) -> Tensor | None:
    return None if parts[0] is None else parts[0] if len(parts) == 1 else torch.cat(parts)


class _Rows(NamedTuple):
    """Samples of one trial for a no-grad solve: latents, targets, conditions and the (σ, σ_eval) to solve them on."""

    trial: _Trial
    z: Tensor
    y: Tensor
    cond: Tensor | None
    grid: tuple[Tensor, Tensor]


def _accepted_mask(accepted: dict[_Trial, Tensor], trial: _Trial, rows: Tensor) -> Tensor:
    """A trial's accepted mask of step 4; all False where its latents did not move (no slack, or no gradient)."""
    return accepted[trial] if trial in accepted else torch.zeros(len(rows), dtype=torch.bool, device=rows.device)


class LD3Bundle:
    """K LD3 trials on the same denoiser, solver, NFE and teacher data, trained in ONE batched solve per step.

    Each trial has its own ``LD3Config`` (learning rates, slack radius, patience, decay, mode, decoupling,
    prior, batch-order seed ...; ``BUNDLE_SHARED_FIELDS`` must agree) and its own ξ, ξᶜ, optimisers, slack
    latents and best state; each solve stacks all trials' samples, with every sample on its own trial's grid,
    so the denoiser sees one batch of K × batch samples per solver step. The samples never interact, so each
    trial's run equals the same trial run alone (``train_ld3``) up to rounding (tests/test_bundle.py).

    Drive it round by round (``run_round`` returns each trial's ``RoundReport``; ``stop`` drops a trial, which
    keeps its best schedule, while the others go on), or all at once (``run``). ``outcomes()`` gives each
    trial's ``LD3Result``, or the ``TrainingDiverged`` it ended with (None while it trains). Arguments as
    ``train_ld3``'s, with ``configs`` (one per trial) and ``callbacks`` (one iterable per trial).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        solver: str | Solver,
        order: int,
        schedule: NoiseSchedule,
        train: TeacherData,
        val: TeacherData,
        configs: Sequence[LD3Config],
        *,
        n_steps: int | None = None,
        nfe: int | None = None,
        decode: Callable[[Tensor], Tensor] | None = None,
        loss_fn: LossFn | None = None,
        callbacks: Sequence[Iterable[Callback | Callable[[StepMetrics], None]]] | None = None,
    ):
        check_bundle(configs)
        if callbacks is not None and len(callbacks) != len(configs):
            raise ValueError(f"callbacks must hold one iterable per trial ({len(configs)}), got {len(callbacks)}")
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be an ld3.schedules.NoiseSchedule, got {type(schedule).__name__}")
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        n_steps, self.nfe = _resolve_steps(solver, order, n_steps, nfe)
        coef_shapes = [_coefficient_shape(solver, order, n_steps, c) for c in configs]
        _check_inputs(train, val)
        device, dtype = train.z.device, train.z.dtype
        move = lambda d: TeacherData(d.z.to(device, dtype), d.y.to(device, dtype),  # noqa: E731
                                     None if d.cond is None else d.cond.to(device))
        self.train, self.val = move(train), move(val)
        loss_fn = get_loss(configs[0].loss) if loss_fn is None else loss_fn
        self.loss_fn = loss_fn.to(device) if isinstance(loss_fn, nn.Module) else loss_fn
        self.shared = configs[0]
        solver_fn = get_solver(solver) if isinstance(solver, str) else solver
        self.solver = GraphedSolver(solver_fn) if self.shared.cuda_graphs else solver_fn
        self.denoiser, self.order, self.decode = _prepare_denoiser(denoiser, self.shared), order, decode
        # Graph replays skip the solver's value checks (host syncs), so a NaN training loss is caught at the
        # step's one sync instead of before the update; eager solves sync on their checks anyway.
        self.solves_are_graphed = isinstance(self.solver, GraphedSolver) and self.train.z.is_cuda
        callbacks = callbacks or [()] * len(configs)
        self.trials = [_Trial(i, c, c.derive(n_steps, self.train.z.shape[1:]), _as_callbacks(cbs), self.train, self.val,
                              n_steps, schedule, shape)
                       for i, (c, cbs, shape) in enumerate(zip(configs, callbacks, coef_shapes, strict=True))]
        for trial in self.trials:
            self._init_from_prior(trial, schedule, n_steps)
        self.round = 0
        self.start = time.perf_counter()

    # ---- public driving API ------------------------------------------------------------------------
    @property
    def rounds(self) -> int:
        """Rounds of both phases (every trial runs the same rounds)."""
        return self.shared.rounds_v1 + self.shared.rounds_v2

    def active(self) -> list[int]:
        """Indices of the trials still training."""
        return [t.index for t in self._active()]

    def outcomes(self) -> list[LD3Result | TrainingDiverged | None]:
        """Per trial: its result, the TrainingDiverged it ended with, or None while it trains."""
        return [t.outcome for t in self.trials]

    def stop(self, trial: int, reason: str = "") -> None:
        """End a trial now (e.g. an early-stopping scheduler's decision): it keeps its best schedule, which is
        scored on the original validation latents as usual; its stop reason reads ``stopped: <reason>``."""
        target = self.trials[trial]
        if target.outcome is None:
            self._finish([target], f"stopped: {reason}" if reason else "stopped")

    def run(self) -> list[LD3Result | TrainingDiverged]:
        """All remaining rounds; returns ``outcomes()``."""
        while self._active():
            self.run_round()
        return self.outcomes()  # type: ignore[return-value]

    def run_round(self) -> list[RoundReport]:
        """One round (docs/method.md#training) for every active trial; a report per trial active at its start."""
        trials = self._active()
        if not trials:
            raise ValueError("every trial of the bundle has finished; read outcomes()")
        phase = 1 if self.round < self.shared.rounds_v1 else 2
        for t in trials:
            t.round, t.phase = self.round, phase
            if self.round > 0:
                t.reload_best()
        self._check_now(trials)
        orders = {t: torch.randperm(len(self.train), generator=t.generator).to(self.train.z.device)
                  .split(self.shared.train_batch_size) for t in self._active()}
        for position in range(math.ceil(len(self.train) / self.shared.train_batch_size)):
            if not self._active():
                break
            self._step({t: orders[t][position] for t in self._active()})
        self._validation_slack_pass(self._active())
        self.round += 1
        if self.round == self.rounds:
            self._finish(self._active(), "completed")
        return [t.report() for t in trials]

    # ---- trial bookkeeping -------------------------------------------------------------------------
    def _active(self) -> list[_Trial]:
        return [t for t in self.trials if t.outcome is None]

    @contextmanager
    def _guard(self, trial: _Trial) -> Iterator[None]:
        """Run per-trial logic; a StopTraining or TrainingDiverged there ends only this trial."""
        try:
            yield
        except StopTraining as stop:  # callbacks run only after the first best state exists
            self._finish([trial], f"stopped: {stop}" if str(stop) else "stopped")
        except TrainingDiverged as error:
            trial.outcome = error

    def _init_from_prior(self, trial: _Trial, schedule: NoiseSchedule, n_steps: int) -> None:
        prior = trial.config.init_prior
        if prior is None:
            return
        if isinstance(prior, str):  # GITS solves a few teacher trajectories from the training latents
            grid = named_grid(prior, n_steps, schedule, denoiser=self.denoiser, z=self.train.z, cond=self.train.cond,
                              latent=self.decode is not None)
        else:
            grid = torch.tensor(prior, dtype=torch.float64)
        trial.init_from_prior(grid)

    # ---- the batched solves ------------------------------------------------------------------------
    def _losses(self, trials: Sequence[_Trial], zs: Sequence[Tensor], ys: Sequence[Tensor],
                conds: Sequence[Tensor | None], grids: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """Per-sample losses d(decode(solver(D, σ_max z, σ, σ_eval)), y) of every trial's rows, in ONE solve."""
        sizes = [z.shape[0] for z in zs]
        sigmas, sigmas_eval = _per_sample_grids(grids, sizes)
        z = _cat(zs)
        x = solve_from_latents(self.denoiser, self.solver, self.order, sigmas, z, sigmas_eval=sigmas_eval,
                               cond=_cat(conds), decode=self.decode,
                               coefficients=trials[0].coef if len(trials) == 1 else None)
        losses = self.loss_fn(x, _cat(ys))
        if losses.shape != (z.shape[0],):
            raise ValueError(f"loss_fn must return one loss per sample, shape ({z.shape[0]},), got {tuple(losses.shape)}")
        return list(losses.split(sizes))

    def _solve_with_slack(self, data: TeacherData, stores: dict[_Trial, Tensor], idx: dict[_Trial, Tensor],
                          grids: dict[_Trial, tuple[Tensor, Tensor]], weights: Tensor | None = None, *,
                          what: str) -> dict[_Trial, tuple[Tensor, Tensor]]:
        """Steps 1 and 3-4 for one batch of each trial with its schedule fixed: its loss (backpropagated) and
        accepted mask, on the device."""
        totals, solved = self._solve(data, stores, idx, grids, weights, what=what)
        accepted = self._judge(stores, idx, solved, self._candidates(data, idx, solved), grids)
        return {t: (totals[t], _accepted_mask(accepted, t, idx[t])) for t in solved}

    def _solve(self, data: TeacherData, stores: dict[_Trial, Tensor], idx: dict[_Trial, Tensor],
               grids: dict[_Trial, tuple[Tensor, Tensor]], weights: Tensor | None = None, *,
               what: str) -> tuple[dict[_Trial, Tensor], dict[_Trial, tuple[Tensor, Tensor, Tensor, Tensor | None]]]:
        """Steps 1 and 3 for one batch of each trial: its loss (backpropagated; returned detached, on the device)
        and what step 4 needs (latent leaf with its gradient, per-sample losses, targets, conditions).

        A trial's loss is its batch mean, or ``sum(weights * losses)`` with per-sample weights. Eager solves
        check each trial's loss for NaN/Inf at once (one sync for all) and end the trials that diverged before
        the backward pass; graphed solves leave that to the caller's one sync per step: a NaN loss then leaves
        NaN only in its own trial's ξ (samples never interact), never in a saved best state."""
        trials = list(idx)
        leaves = [stores[t][idx[t]].requires_grad_(t.hp.slack_radius > 0) for t in trials]
        ys = [data.y[idx[t]] for t in trials]
        conds = [None if data.cond is None else data.cond[idx[t]] for t in trials]
        losses = self._losses(trials, leaves, ys, conds, [grids[t] for t in trials])
        finite = [True] * len(trials)
        if not self.solves_are_graphed:
            finite = torch.stack([torch.isfinite(part.detach().sum()) for part in losses]).tolist()
        kept = [i for i, ok in enumerate(finite) if ok]
        for i, ok in enumerate(finite):
            if not ok:
                trials[i].outcome = trials[i].diverged(what)
        totals = {i: losses[i].mean() if weights is None else (weights * losses[i]).sum() for i in kept}
        total = sum(totals.values())
        if kept and total.requires_grad:
            total.backward()
        return ({trials[i]: totals[i].detach() for i in kept},
                {trials[i]: (leaves[i], losses[i].detach(), ys[i], conds[i]) for i in kept})

    def _candidates(self, data: TeacherData, idx: dict[_Trial, Tensor],
                    solved: dict[_Trial, tuple[Tensor, Tensor, Tensor, Tensor | None]]) -> dict[_Trial, Tensor]:
        """Step 3: each trial's SGD step of z' projected back onto its ball (trials with slack and a gradient only)."""
        moving = [t for t, (leaf, *_) in solved.items() if t.hp.slack_radius > 0 and leaf.grad is not None]
        with torch.no_grad():
            return {t: project_to_ball(solved[t][0] - t.shift_lr * solved[t][0].grad, data.z[idx[t]], t.hp.slack_radius)
                    for t in moving}

    @staticmethod
    def _candidate_rows(candidates: dict[_Trial, Tensor], solved: dict[_Trial, tuple[Tensor, Tensor, Tensor, Tensor | None]],
                        grids: dict[_Trial, tuple[Tensor, Tensor]]) -> list[_Rows]:
        """Each trial's candidate latents with their targets, to be scored under its (no-grad) grid."""
        return [_Rows(t, candidate, solved[t][2], solved[t][3], grids[t])
                for t, candidate in candidates.items()]

    @staticmethod
    def _accept(stores: dict[_Trial, Tensor], idx: dict[_Trial, Tensor],
                solved: dict[_Trial, tuple[Tensor, Tensor, Tensor, Tensor | None]], candidates: dict[_Trial, Tensor],
                new_losses: Sequence[Tensor]) -> dict[_Trial, Tensor]:
        """Step 4: keep each candidate where its loss is below the old latent's (a NaN loss never is) -> masks."""
        accepted = {}
        for (t, candidate), new in zip(candidates.items(), new_losses, strict=True):
            accept = new < solved[t][1]
            stores[t][idx[t]] = torch.where(accept.reshape(-1, 1, 1, 1), candidate, stores[t][idx[t]])
            accepted[t] = accept
        return accepted

    def _judge(self, stores: dict[_Trial, Tensor], idx: dict[_Trial, Tensor],
               solved: dict[_Trial, tuple[Tensor, Tensor, Tensor, Tensor | None]], candidates: dict[_Trial, Tensor],
               grids: dict[_Trial, tuple[Tensor, Tensor]]) -> dict[_Trial, Tensor]:
        """Step 4 in a solve of its own: all trials' candidates scored together, each under its ``grids`` entry."""
        if not candidates:
            return {}
        rows = self._candidate_rows(candidates, solved, grids)
        return self._accept(stores, idx, solved, candidates, self._row_losses(rows, sum(len(r.z) for r in rows)))

    def _row_losses(self, groups: Sequence[_Rows], batch: int) -> list[Tensor]:
        """Per-sample losses of every group in ONE no-grad solve, ``batch`` rows at a time, each group on its grid.

        The samples never interact, so each loss is the one a solve of its group alone gives (up to kernel rounding).
        Coefficient corrections are one per solve: only a bundle of one trial has them (``check_bundle``)."""
        sizes = [len(g.z) for g in groups]
        sigmas, sigmas_eval = _per_sample_grids([g.grid for g in groups], sizes)
        losses = sample_losses(self.denoiser, self.solver, self.order, sigmas, _cat([g.z for g in groups]),
                               _cat([g.y for g in groups]), self.loss_fn, sigmas_eval=sigmas_eval,
                               cond=_cat([g.cond for g in groups]), decode=self.decode,
                               coefficients=groups[0].trial.coef, batch_size=batch)
        return list(losses.split(sizes))

    def _check_batch(self, trials: int) -> int:
        """Rows per no-grad check solve: ``val_solve_batch_size`` (else ``val_batch_size``) per trial."""
        return (self.shared.val_solve_batch_size or self.shared.val_batch_size) * trials

    @staticmethod
    def _check_rows(trials: Sequence[_Trial], data: TeacherData, latents: dict[_Trial, Tensor], counts: dict[_Trial, int],
                    grids: dict[_Trial, tuple[Tensor, Tensor]]) -> list[_Rows]:
        """Each trial's first ``counts`` latents with their targets, to be scored under its (no-grad) grid."""
        return [_Rows(t, latents[t][:counts[t]], data.y[:counts[t]],
                      None if data.cond is None else data.cond[:counts[t]], grids[t]) for t in trials]

    @torch.no_grad()
    def _mean_losses(self, trials: Sequence[_Trial], data: TeacherData, latents: dict[_Trial, Tensor],
                     counts: dict[_Trial, int]) -> dict[_Trial, Tensor]:
        """Mean per-sample loss of each trial's current schedule on its first ``counts`` latents (float64, device)."""
        rows = self._check_rows(trials, data, latents, counts, {t: t.disc() for t in trials})
        losses = self._row_losses(rows, self._check_batch(len(trials)))
        return {t: part.to(torch.float64).mean() for t, part in zip(trials, losses, strict=True)}

    def _check_counts(self, trials: Iterable[_Trial]) -> dict[_Trial, int]:
        """Samples of each trial's validation check (first validation batch, or all once ``val_on_all``)."""
        return {t: t.check_count(len(self.val)) for t in trials}

    def _val_losses(self, trials: Sequence[_Trial]) -> dict[_Trial, Tensor]:
        """Each trial's validation-check loss, on the device."""
        return self._mean_losses(trials, self.val, {t: t.z_val for t in trials}, self._check_counts(trials))

    @torch.no_grad()
    def _to_host(self, scalars: dict[_Trial, list[Tensor]]) -> dict[_Trial, tuple[list[float], Tensor, Tensor]]:
        """Each trial's device scalars and current (σ, σ_eval), copied to the CPU in ONE host synchronisation.

        The trainer reads the GPU only here, once per step, so between two checks the host queues the
        next step's kernels while the device still runs the last ones."""
        pieces, layout = [], []
        for t, values in scalars.items():
            sigmas, sigmas_eval = t.disc()
            pieces += [torch.stack([v.detach().to(torch.float64) for v in values]),
                       sigmas.to(torch.float64), sigmas_eval.to(torch.float64)]
            layout.append((t, len(values), sigmas.numel()))
        packed = torch.cat(pieces).cpu() if pieces else torch.zeros(0)
        out, at = {}, 0
        for t, count, n in layout:
            out[t] = (packed[at:at + count].tolist(), packed[at + count:at + count + n].clone(),
                      packed[at + count + n:at + count + 2 * n].clone())
            at += count + 2 * n
        return out

    def _rescore(self, trial: _Trial) -> Callable[[], float]:
        return lambda: self._to_host({trial: [self._val_losses([trial])[trial]]})[trial][0][0]

    # ---- one round's parts (docs/method.md#training, steps 1-5) ------------------------------------
    def _check_now(self, trials: list[_Trial]) -> None:
        """A validation check of every trial outside a training step (round start)."""
        host = self._to_host({t: [loss] for t, loss in self._val_losses(trials).items()})
        for t in trials:
            with self._guard(t):
                (loss,), sigmas, sigmas_eval = host[t]
                t.check(loss, sigmas, sigmas_eval, self._rescore(t))

    def _step(self, idx: dict[_Trial, Tensor]) -> None:
        """Steps 1-5 on one batch of every active trial, and the step's reports.

        Steps 4 and 5 share ONE no-grad solve after the ξ step: every trial's candidates, each under the grid it
        is judged with (the pre-step one; with ``accept_after_step`` the post-step one, the reference's rule), and
        every trial's check rows under its post-step grid. A trial whose ξ step also moves its coefficient
        corrections (one set per solve) judges its candidates before the step, in a solve of their own."""
        grids, stores, totals, solved = self._training_solve(idx)
        if not totals:
            return
        candidates = self._candidates(self.train, idx, solved)
        before = {t: tuple(g.detach() for g in grids[t]) for t in candidates if not t.config.accept_after_step}
        alone = {t: candidates.pop(t) for t in list(before) if t.changes_coefficients()}
        accepted = self._judge(stores, idx, solved, alone, before)
        for t in totals:
            t.step_parameters()
            t.step += 1
        with torch.no_grad():
            after = {t: t.disc() for t in totals}
        judged = self._candidate_rows(candidates, solved, {t: before.get(t, after[t]) for t in candidates})
        checks = self._check_rows(list(totals), self.val, {t: t.z_val for t in totals}, self._check_counts(totals), after)
        losses = self._row_losses(judged + checks, self._check_batch(len(totals)) + sum(len(r.z) for r in judged))
        accepted |= self._accept(stores, idx, solved, candidates, losses[:len(judged)])
        val_losses = {t: part.to(torch.float64).mean() for t, part in zip(totals, losses[len(judged):], strict=True)}
        self._report_step(idx, totals, accepted, val_losses)

    def _training_solve(self, idx: dict[_Trial, Tensor]) -> tuple[
            dict[_Trial, tuple[Tensor, Tensor]], dict[_Trial, Tensor], dict[_Trial, Tensor],
            dict[_Trial, tuple[Tensor, Tensor, Tensor, Tensor | None]]]:
        """Steps 1-2 up to the backward pass on one batch of every active trial: the (σ, σ_eval) it was solved on
        (with gradients), its training latents, its loss and what steps 3-4 need (``_solve``)."""
        for t in idx:
            t.set_trainable(t.phase)
        grids = {t: t.disc() for t in idx}
        stores = {t: t.z_train for t in idx}
        return grids, stores, *self._solve(self.train, stores, idx, grids, what="the training loss")

    def _report_step(self, idx: dict[_Trial, Tensor], totals: dict[_Trial, Tensor], accepted: dict[_Trial, Tensor],
                     val_losses: dict[_Trial, Tensor]) -> None:
        """One host sync for every trial's step metrics and schedule, then per trial: its validation check (best
        state, patience), its ``StepMetrics`` and the ``lr2_floor`` stop."""
        host = self._to_host({t: [loss, val_losses[t], _accepted_mask(accepted, t, idx[t]).float().mean(),
                                  t.max_slack_distance(self.train, self.val)] for t, loss in totals.items()})
        for t in totals:
            with self._guard(t):
                (train_loss, val_loss, accepted_fraction, slack_distance), sigmas, sigmas_eval = host[t]
                t.require_finite(train_loss, "the training loss")
                t.check(val_loss, sigmas, sigmas_eval, self._rescore(t))
                t.emit_step(train_loss, val_loss, accepted_fraction, slack_distance, sigmas, sigmas_eval)
                if t.lr2_floor_hits >= t.config.lr2_floor_hits:
                    self._finish([t], "lr2_floor")

    def _validation_slack_pass(self, trials: list[_Trial]) -> None:
        """Slack steps on each trial's validation latents with its schedule fixed; a trial none of whose
        latents moved multiplies its shift_lr by ``shift_lr_decay``.

        With the schedules fixed the samples are independent, so they are solved ``val_slack_batch_size``
        per trial at a time; each loss is weighted by 1 / (size of its ``train_batch_size`` chunk), so every
        latent takes the step of the reference's per-train-batch pass whatever the batch."""
        trials = [t for t in trials if t.hp.slack_radius > 0]
        if not trials:
            return
        for t in trials:
            t.freeze()
        with torch.no_grad():
            grids = {t: t.disc() for t in trials}
        count, device = len(self.val), self.val.z.device
        chunk_sizes = [len(c) for c in torch.arange(count).split(self.shared.train_batch_size)]
        weights = torch.cat([torch.full((n,), 1.0 / n) for n in chunk_sizes]).to(device, self.val.z.dtype)
        batch = self.shared.val_slack_batch_size or self.shared.train_batch_size
        moved = {t: torch.zeros((), dtype=torch.bool, device=device) for t in trials}
        losses: dict[_Trial, list[Tensor]] = {t: [] for t in trials}
        for idx in torch.arange(count, device=device).split(batch):
            live = [t for t in trials if t.outcome is None]
            if not live:
                return
            solved = self._solve_with_slack(self.val, {t: t.z_val for t in live}, {t: idx for t in live}, grids,
                                            weights[idx], what="the validation slack loss")
            for t, (loss, accept) in solved.items():
                losses[t].append(loss)
                moved[t] |= accept.any()
        live = [t for t in trials if t.outcome is None]
        host = self._to_host({t: [*losses[t], moved[t]] for t in live})
        for t in live:
            with self._guard(t):
                values = host[t][0]
                t.require_finite(torch.tensor(values[:-1]), "the validation slack loss")
                if not values[-1]:
                    t.shift_lr *= t.config.shift_lr_decay

    def _finish(self, trials: list[_Trial], stop_reason: str) -> None:
        """End trials: each best state, scored on the ORIGINAL validation latents (no slack), in one batched solve."""
        if not trials:
            return
        wall_time_s = time.perf_counter() - self.start
        for t in trials:
            if t.best is not None:  # else stopped before its first check: the initial schedule
                t.reload_best()
        finals = self._mean_losses(trials, self.val, {t: self.val.z for t in trials}, {t: len(self.val) for t in trials})
        host = self._to_host({t: [finals[t], t.max_slack_distance(self.train, self.val)] for t in trials})
        for t in trials:
            (final, slack_distance), sigmas, sigmas_eval = host[t]
            if not math.isfinite(final):
                t.outcome = t.diverged("the final validation loss")
                continue
            t.outcome = LD3Result(
                sigmas=sigmas, sigmas_eval=sigmas_eval, best_val_loss=math.inf if t.best is None else t.best.val_loss,
                final_val_loss=final,
                n_steps=t.disc.n_steps, nfe=self.nfe, steps=t.step, max_slack_distance=slack_distance,
                stop_reason=stop_reason, wall_time_s=wall_time_s, hyperparameters=t.hp, history=tuple(t.history),
                coefficients=t.host_coefficients(),
            )


def train_ld3(
    denoiser: Denoiser,
    solver: str | Solver,
    order: int,
    schedule: NoiseSchedule,
    train: TeacherData,
    val: TeacherData,
    config: LD3Config = LD3Config(),
    *,
    n_steps: int | None = None,
    nfe: int | None = None,
    decode: Callable[[Tensor], Tensor] | None = None,
    loss_fn: LossFn | None = None,
    callbacks: Iterable[Callback | Callable[[StepMetrics], None]] = (),
) -> LD3Result:
    """Learn the discretisation (σ, σ_eval) of ``solver`` for ``denoiser`` by LD3 (docs/method.md#training).

    Args:
        denoiser: ``D(x, sigma, cond=None) -> x0_hat`` in EDM form.
        solver: a name in ``ld3.solvers.SOLVERS`` or a solver function with the same signature.
        order: the solver's order.
        schedule: the model's noise schedule (σ range, native time for ``mode="time"``).
        train, val: teacher pairs; device and dtype of the run follow ``train.z``.
        config: hyperparameters (``LD3Config``).
        n_steps / nfe: exactly one: the grid's step count N, or the denoiser-call budget (named solver).
        decode: applied to the solver's output before the loss (latent models); the teacher's ``y``
            must already be decoded.
        loss_fn: per-sample loss ``(ŷ, y) -> [B]``; default ``ld3.losses.get_loss(config.loss)``.
        callbacks: ``Callback`` objects or functions of ``StepMetrics``; they may raise ``StopTraining``.

    Returns the best schedule (and, with ``learn_coefficients``, the best coefficient corrections, to pass as
    ``coefficients=`` to the solver or ``ld3.sampling.sample``), its loss on the original validation latents
    and the history. It is the bundle of one trial (``LD3Bundle``).
    Raises ``TrainingDiverged`` (with the last finite best schedule attached) if the loss turns NaN/Inf.
    """
    (outcome,) = LD3Bundle(denoiser, solver, order, schedule, train, val, [config], n_steps=n_steps, nfe=nfe,
                           decode=decode, loss_fn=loss_fn, callbacks=[callbacks]).run()
    if isinstance(outcome, TrainingDiverged):
        raise outcome
    return outcome
