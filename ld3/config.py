"""The LD3 trainer's configuration (docs/method.md#defaults-and-derived-values): every knob with the reference
defaults, validated against the plain-data names of ``ld3.catalog``. Imports no torch, so a study's config is built
and checked (``--help``, ``--dry-run``) without loading the trainer; ``ld3.train`` re-exports ``LD3Config``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ld3.catalog import BASELINE_NAMES, LOSS_NAMES


@dataclass(frozen=True)
class LD3Config:
    """Every knob of the LD3 trainer, with the reference defaults (pixel-space models).

    For latent models the reference uses ``lr2 = 0.001 / N`` (``lr2_coef = 0.001``), ``rounds_v2 = 3`` and
    ``train_batch_size = 1``: see ``LD3Config.for_latent_model``. Derived values (``lr2``,
    ``shift_lr``, ``slack_radius`` when None) come from ``derive(n_steps, latent_shape)``.
    """

    rounds_v1: int = 2  # phase-1 rounds: only ξ trained
    rounds_v2: int = 5  # phase-2 rounds: ξ and ξᶜ (reference: 3 for latent models)
    train_batch_size: int = 2  # reference: 2 pixel, 1 latent
    val_batch_size: int = 25  # batch of validation solves; early checks use only the first batch (reference scripts: 25)
    lr1: float = 0.005  # RMSprop on ξ
    momentum1: float = 0.9  # RMSprop momentum
    lr2: float | None = None  # SGD on ξᶜ; None -> lr2_coef / N
    lr2_coef: float = 0.1  # lr2 = lr2_coef / N when lr2 is None (reference: 0.1 pixel, 0.001 latent models)
    grad_clip: float = 1.0  # max gradient norm, each of ξ and ξᶜ
    shift_lr: float | None = None  # SGD on slack latents; None -> 12 / N
    shift_lr_decay: float = 0.5  # factor after a round that moved no validation latent
    slack_radius: float | None = None  # r; None -> slack_coef * C*H*W / N^2
    slack_coef: float = 0.001  # used only when slack_radius is None
    patience: int = 5  # non-improving validation checks before reloading the best state
    lr_decay: float = 0.8  # learning-rate factor at each reload (after the first)
    lr1_floor: float = 5e-5
    lr2_floor: float = 1e-6
    lr2_floor_hits: int = 5  # stop once lr2 has been at its floor this many times
    mode: str = "lambda"  # "lambda" (half log-SNR) or "time" (native time) parametrisation
    decoupled: bool = True  # learn a separate set of denoiser evaluation points σ_eval
    win_rate: float = 0.5  # window of σ_eval around σ, fraction of the smallest gap
    learn_coefficients: bool = False  # phase 2 also learns corrections to the solver's multistep weights
    lr_coef: float = 0.3  # Adam on the coefficient corrections (bench/gmm_coefficients.py)
    coef_clip: float = 0.1  # max gradient norm of the coefficient corrections
    init_prior: str | tuple[float, ...] | None = None  # ld3.baselines name (incl. gits, dmn, ays_sd15) or σ grid to fit ξ to first
    loss: str = "l2"  # "l2" | "l1" | "lpips" (ld3.catalog.LOSS_NAMES), unless train_ld3 gets loss_fn=
    grad_checkpointing: bool = False  # recompute each denoiser call in backward (memory ~ 1 call)
    compile: bool = False  # torch.compile the denoiser
    cuda_graphs: bool = False  # replay solves + backward from CUDA graphs (ld3.cuda_graphs): same kernels, ~3x faster
    accept_after_step: bool = False  # judge a slack step under the schedule after the ξ step (reference code's rule)
    val_slack_batch_size: int | None = None  # batch of the validation slack pass; None -> train_batch_size (same steps)
    val_solve_batch_size: int | None = None  # batch of the checks' no-grad solves; None -> val_batch_size (same losses)
    seed: int = 0  # order of training batches

    def __post_init__(self) -> None:
        checks = [
            ("rounds_v1", self.rounds_v1 >= 0, "an integer >= 0"),
            ("rounds_v2", self.rounds_v2 >= 0 and self.rounds_v1 + self.rounds_v2 >= 1, ">= 0, with rounds_v1 + rounds_v2 >= 1"),
            ("train_batch_size", self.train_batch_size >= 1, "an integer >= 1"),
            ("val_batch_size", self.val_batch_size >= 1, "an integer >= 1"),
            ("val_slack_batch_size", self.val_slack_batch_size is None or self.val_slack_batch_size >= 1,
             "an integer >= 1 or None (train_batch_size)"),
            ("val_solve_batch_size", self.val_solve_batch_size is None or self.val_solve_batch_size >= 1,
             "an integer >= 1 or None (val_batch_size)"),
            ("lr1", self.lr1 > 0, "> 0"),
            ("momentum1", 0 <= self.momentum1 < 1, "in [0, 1)"),
            ("lr2", self.lr2 is None or self.lr2 > 0, "> 0 or None (lr2_coef / N)"),
            ("lr2_coef", self.lr2_coef > 0, "> 0"),
            ("grad_clip", self.grad_clip > 0, "> 0"),
            ("shift_lr", self.shift_lr is None or self.shift_lr >= 0, ">= 0 or None (12 / N)"),
            ("shift_lr_decay", 0 < self.shift_lr_decay <= 1, "in (0, 1]"),
            ("slack_radius", self.slack_radius is None or self.slack_radius >= 0, ">= 0 (0 disables the slack) or None"),
            ("slack_coef", self.slack_coef >= 0, ">= 0"),
            ("patience", self.patience >= 1, "an integer >= 1"),
            ("lr_decay", 0 < self.lr_decay < 1, "in (0, 1)"),
            ("lr1_floor", 0 < self.lr1_floor <= self.lr1, "in (0, lr1]"),
            ("lr2_floor", self.lr2_floor > 0, "> 0"),
            ("lr2_floor_hits", self.lr2_floor_hits >= 1, "an integer >= 1"),
            ("mode", self.mode in ("lambda", "time"), "'lambda' or 'time'"),
            ("win_rate", 0 <= self.win_rate <= 0.5, "in [0, 0.5] (evaluation points must not cross)"),
            ("learn_coefficients", isinstance(self.learn_coefficients, bool), "True or False"),
            ("accept_after_step", isinstance(self.accept_after_step, bool), "True or False"),
            ("lr_coef", self.lr_coef > 0, "> 0"),
            ("coef_clip", self.coef_clip > 0, "> 0"),
            ("cuda_graphs", not (self.cuda_graphs and self.learn_coefficients),
             "False with learn_coefficients=True (graphed solves do not take coefficients)"),
            ("loss", self.loss in LOSS_NAMES, f"one of {list(LOSS_NAMES)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"LD3Config.{name} must be {expected}, got {getattr(self, name)!r}")
        prior = self.init_prior
        if isinstance(prior, str) and prior not in BASELINE_NAMES:
            raise ValueError(f"LD3Config.init_prior must be one of {list(BASELINE_NAMES)} or a σ grid, got {prior!r}")
        if prior is not None and not isinstance(prior, (str, tuple)):
            raise ValueError(f"LD3Config.init_prior must be a baseline name or a tuple of σ values, got {type(prior).__name__}")

    @classmethod
    def for_latent_model(cls, **overrides) -> LD3Config:
        """The reference recipe for latent/SD models: lr2 = 0.001 / N, 3 phase-2 rounds, batch 1."""
        return cls(**{"lr2_coef": 0.001, "rounds_v2": 3, "train_batch_size": 1, **overrides})

    def lr2_coefficient(self, n_steps: int) -> float:
        """The coefficient c of lr2 = c / N (``lr2_coef``, or an explicit ``lr2`` times N): the inverse of ``derive``'s lr2."""
        return self.lr2_coef if self.lr2 is None else self.lr2 * n_steps

    def derive(self, n_steps: int, latent_shape: Sequence[int]) -> DerivedHyperparameters:
        """Values the config leaves to N and the latent size (docs/method.md#defaults-and-derived-values)."""
        size = math.prod(latent_shape)
        radius = self.slack_coef * size / n_steps**2 if self.slack_radius is None else self.slack_radius
        return DerivedHyperparameters(
            lr2=self.lr2_coef / n_steps if self.lr2 is None else self.lr2,
            shift_lr=12.0 / n_steps if self.shift_lr is None else self.shift_lr,
            slack_radius=float(radius),
        )


@dataclass(frozen=True)
class DerivedHyperparameters:
    """Learning rates and slack radius resolved for one N and latent shape."""

    lr2: float
    shift_lr: float
    slack_radius: float


# What the trials of one LD3Bundle must agree on: they fix the rounds, the batches and the solve (ld3.train.check_bundle).
BUNDLE_SHARED_FIELDS = ("rounds_v1", "rounds_v2", "train_batch_size", "val_batch_size", "val_slack_batch_size",
                        "val_solve_batch_size", "loss", "grad_checkpointing", "compile", "cuda_graphs")
