"""What the search explores: the solver of a cell, Optuna's define-by-run space over LD3's hyperparameters
(docs/design.md#the-search-space), and the one boundary where a trial's sampled dict becomes an ``LD3Config``.
Plain data: importing it loads neither torch nor Optuna (a study's config is built from it at import)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ld3.catalog import check_order, solver_info, solver_steps_for_nfe
from ld3.config import LD3Config

if TYPE_CHECKING:
    import optuna

INITS = ("uniform", "best_baseline")


MEMBER_CPUS = 0.01  # what a trial of a bundle asks Ray for (a Ray placement group cannot be all zeros)

@dataclass(frozen=True)
class SolverChoice:
    """A solver of ``ld3.solvers`` (by its name in ``ld3.catalog.SOLVER_TABLE``) and its order."""

    name: str
    order: int

    def __post_init__(self) -> None:
        solver_info(self.name)  # a ValueError listing the solvers
        check_order(self.name, self.order)

    @property
    def label(self) -> str:
        return f"{self.name}-o{self.order}"

    def n_steps(self, nfe: int) -> int:
        """Grid steps N on which this solver spends ``nfe`` denoiser calls (ValueError when it cannot)."""
        return solver_steps_for_nfe(self.name, nfe)


@dataclass(frozen=True)
class SearchSpace:
    """What Optuna searches (docs/design.md, the search space); ranges are inclusive."""

    slack_coef: tuple[float, float] = (1e-4, 1e-2)  # r = coef·C·H·W/N², log scale around the recipe's 1e-3
    lr1: tuple[float, float] = (1e-3, 3e-2)  # RMSprop on ξ, log scale (recipe: 5e-3)
    decoupled: tuple[bool, ...] = (True, False)
    lr2_coef: tuple[float, float] = (1e-2, 1.0)  # lr2 = coef/N, log scale, only with decoupling (pixel: 0.1)
    win_rate: tuple[float, float] = (0.1, 0.5)  # only with decoupling
    rounds_v1: tuple[int, int] = (1, 3)
    rounds_v2: tuple[int, int] = (2, 6)
    modes: tuple[str, ...] = ("lambda", "time")
    train_batch_sizes: tuple[int, ...] = (1, 2, 4)
    # Start of ξ: "uniform" (ξ = 1, uniform in the mode's space) or the cell's best baseline grid.
    inits: tuple[str, ...] = ("uniform", "best_baseline")
    # Learned solver coefficients (docs/method.md#learned-coefficients): (False,) off, (True,) on, (False, True) searched.
    learn_coefficients: tuple[bool, ...] = (False,)
    lr_coef: tuple[float, float] = (0.03, 1.0)  # Adam on the coefficient corrections, log scale, only when learned

    def __post_init__(self) -> None:
        for name in ("slack_coef", "lr1", "lr2_coef", "lr_coef"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"SearchSpace.{name} must be (low, high) with 0 < low <= high, got {(low, high)}")
        if not 0 < self.win_rate[0] <= self.win_rate[1] <= 0.5:
            raise ValueError(f"SearchSpace.win_rate must lie in (0, 0.5], got {self.win_rate}")
        if not 0 <= self.rounds_v1[0] <= self.rounds_v1[1] or not 0 <= self.rounds_v2[0] <= self.rounds_v2[1]:
            raise ValueError("SearchSpace.rounds_v1/rounds_v2 must be (low, high) with 0 <= low <= high")
        if not self.decoupled or not self.modes or not self.train_batch_sizes or not self.inits:
            raise ValueError("SearchSpace.decoupled, modes, train_batch_sizes and inits need at least one choice each")
        if not self.learn_coefficients or not set(self.learn_coefficients) <= {False, True}:
            raise ValueError(f"SearchSpace.learn_coefficients must be (False,), (True,) or (False, True), "
                             f"got {self.learn_coefficients}")
        if not set(self.inits) <= set(INITS):
            raise ValueError(f"SearchSpace.inits must be chosen from {INITS}, got {self.inits}")

    def suggest(self, trial: optuna.Trial) -> None:
        """Optuna define-by-run space; lr2 and win_rate exist only when decoupling is on."""
        trial.suggest_float("slack_coef", *self.slack_coef, log=True)
        trial.suggest_float("lr1", *self.lr1, log=True)
        if trial.suggest_categorical("decoupled", list(self.decoupled)):
            trial.suggest_float("lr2_coef", *self.lr2_coef, log=True)
            trial.suggest_float("win_rate", *self.win_rate)
        trial.suggest_int("rounds_v1", *self.rounds_v1)
        trial.suggest_int("rounds_v2", *self.rounds_v2)
        trial.suggest_categorical("mode", list(self.modes))
        trial.suggest_categorical("train_batch_size", list(self.train_batch_sizes))
        trial.suggest_categorical("init", list(self.inits))
        if trial.suggest_categorical("learn_coefficients", list(self.learn_coefficients)):
            trial.suggest_float("lr_coef", *self.lr_coef, log=True)

    def varied_fields(self) -> set[str]:
        """The ``LD3Config`` fields whose value this space lets differ between trials."""
        ranges = {"slack_coef": self.slack_coef, "lr1": self.lr1, "lr2_coef": self.lr2_coef, "win_rate": self.win_rate,
                  "rounds_v1": self.rounds_v1, "rounds_v2": self.rounds_v2, "lr_coef": self.lr_coef}
        choices = {"decoupled": self.decoupled, "mode": self.modes, "train_batch_size": self.train_batch_sizes,
                   "init_prior": self.inits, "learn_coefficients": self.learn_coefficients}
        return ({name for name, (low, high) in ranges.items() if low != high}
                | {name for name, options in choices.items() if len(set(options)) > 1})

    @property
    def max_epochs(self) -> int:
        """The most passes over the training data a trial can make (ASHA's max_t)."""
        return self.rounds_v1[1] + self.rounds_v2[1]


def hyperparameters_to_config(params: Mapping[str, Any], base: LD3Config, best_baseline: str | None = None) -> LD3Config:
    """A trial's sampled hyperparameters -> the trainer's config (Tune's dict becomes a dataclass here).

    The sampled ``lr2_coef`` stays a coefficient: ``LD3Config.derive`` turns it into lr2 = coef/N.
    ``init="best_baseline"`` starts ξ at ``best_baseline`` (docs/method.md: initialisation from a prior grid)."""
    decoupled = bool(params["decoupled"])
    init = params.get("init", "uniform")
    if init == "best_baseline" and best_baseline is None:
        raise ValueError("init='best_baseline' needs the name of the cell's best baseline")
    overrides: dict[str, Any] = {
        "slack_radius": None,
        "slack_coef": float(params["slack_coef"]),
        "lr1": float(params["lr1"]),
        "decoupled": decoupled,
        "rounds_v1": int(params["rounds_v1"]),
        "rounds_v2": int(params["rounds_v2"]),
        "mode": str(params["mode"]),
        "train_batch_size": int(params["train_batch_size"]),
        "init_prior": best_baseline if init == "best_baseline" else base.init_prior,
    }
    if decoupled:
        overrides.update(lr2=None, lr2_coef=float(params["lr2_coef"]), win_rate=float(params["win_rate"]))
    if params.get("learn_coefficients", base.learn_coefficients):  # docs/method.md#learned-coefficients
        overrides.update(learn_coefficients=True, lr_coef=float(params.get("lr_coef", base.lr_coef)))
    else:
        overrides["learn_coefficients"] = False
    return replace(base, **overrides)


def reference_point(base: LD3Config, space: SearchSpace, n_steps: int) -> dict[str, Any]:
    """The paper's recipe as a search point (evaluated first, so the search starts from it)."""
    point = {
        "slack_coef": base.slack_coef,
        "lr1": base.lr1,
        "decoupled": base.decoupled,
        "rounds_v1": base.rounds_v1,
        "rounds_v2": base.rounds_v2,
        "mode": base.mode,
        "train_batch_size": base.train_batch_size,
        "init": "uniform",
        "learn_coefficients": base.learn_coefficients,
    }
    if base.decoupled:
        point.update(lr2_coef=base.lr2_coefficient(n_steps), win_rate=base.win_rate)
    if base.learn_coefficients:
        point["lr_coef"] = base.lr_coef
    return _clip_to_space(point, space)


def _clip_to_space(point: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    clipped = dict(point)
    for name in ("slack_coef", "lr1", "lr2_coef", "win_rate", "rounds_v1", "rounds_v2", "lr_coef"):
        if name in clipped:
            low, high = getattr(space, name)
            clipped[name] = min(max(clipped[name], low), high)
    for name, choices in (("decoupled", space.decoupled), ("mode", space.modes),
                          ("train_batch_size", space.train_batch_sizes), ("init", space.inits),
                          ("learn_coefficients", space.learn_coefficients)):
        if clipped[name] not in choices:
            clipped[name] = choices[0]
    if not clipped["decoupled"]:
        clipped.pop("lr2_coef", None)
        clipped.pop("win_rate", None)
    elif "lr2_coef" not in clipped:
        clipped.update(lr2_coef=math.sqrt(space.lr2_coef[0] * space.lr2_coef[1]), win_rate=space.win_rate[1])
    if not clipped["learn_coefficients"]:
        clipped.pop("lr_coef", None)
    elif "lr_coef" not in clipped:
        clipped["lr_coef"] = math.sqrt(space.lr_coef[0] * space.lr_coef[1])
    return clipped
