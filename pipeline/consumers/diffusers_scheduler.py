"""``LD3Scheduler``: a diffusers scheduler that runs an exported LD3 schedule exactly, decoupled ones included.

diffusers pipelines loop ``for t in scheduler.timesteps: out = net(scheduler.scale_model_input(x, t), t);
x = scheduler.step(out, t, x).prev_sample``. This scheduler makes that loop evaluate the network where the
exported solver evaluates its denoiser (the decoupled points ``sigmas_eval``, and the second evaluation of
the singlestep solvers, like diffusers' HeunDiscreteScheduler with 2 timesteps per step) and steps with the
solver functions of ``ld3.solvers`` themselves, so a pipeline reproduces ``ld3.sampling.sample``.

Stepping a closed solver loop one evaluation at a time (:class:`SolverReplay`): every ``step`` re-runs the
solver from the initial state on the model outputs received so far; the denoiser it calls hands back the
recorded outputs and stops the run at the first evaluation not made yet. Only solver arithmetic is repeated
(O(N²) vector updates for N steps, no network call), and the states are bit-identical to one solve.

State convention (that of diffusers' multistep VP schedulers, e.g. DPMSolverMultistepScheduler): the
pipeline's latents are the network's input ``x_vp = α x`` at the next evaluation point (``x`` the EDM-form
state, ``α = 1/sqrt(1 + σ'²)`` for VP models, 1 for EDM/VE ones), ``scale_model_input`` is the identity
and ``init_noise_sigma = α σ_0`` makes ``latents = init_noise_sigma · z`` the state ``x_T = σ_0 z`` of
``ld3.sampling.sample``. Pipelines that skip ``init_noise_sigma`` (DDPMPipeline, DiTPipeline) start from
``x_vp = z``, i.e. from ld3's latent ``z / init_noise_sigma``. The last ``step`` returns the solver's result
at ``σ_N`` in EDM form, exactly what ``ld3.sampling.sample`` returns (for latent models before decoding).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from diffusers.utils import BaseOutput
except ImportError as error:  # diffusers is an optional dependency (the "models" extra)
    raise ImportError(f"LD3Scheduler needs diffusers ({error}); install it with pip install -e '.[models]'") from error

from ld3.models.diffusers_models import PREDICTION_TYPES, x0_from_prediction
from ld3.solvers.registry import get_spec
from pipeline.recording.export_tools import native_schedule, noise_schedule_named
from pipeline.recording.exports import load_schedule

EDM_PREDICTION_TYPES = ("epsilon", "sample")
_BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
ToDenoised = Callable[[Tensor, Tensor, Tensor], Tensor]  # (model output, x, sigma [B]) -> D(x, sigma)


class _NextEvaluation(Exception):
    """Raised by the replay denoiser at the first evaluation without a recorded model output."""

    def __init__(self, x: Tensor, sigma: Tensor):
        super().__init__("next evaluation")
        self.x, self.sigma = x, sigma


class SolverReplay:
    """An ``ld3.solvers`` solve driven one denoiser evaluation at a time (module docstring).

    ``advance(output)`` records the model output of the pending evaluation and returns the state and
    σ' of the next one, or the final state with σ' ``None``; ``last_denoised`` is D of the newest output.
    """

    def __init__(self, solver: str, order: int, sigmas: Tensor, sigmas_eval: Tensor | None, x_start: Tensor,
                 to_denoised: ToDenoised, coefficients: Tensor | None = None):
        self.solve = get_spec(solver).fn
        self.order, self.sigmas, self.sigmas_eval = order, sigmas, sigmas_eval
        self.extra = {} if coefficients is None else {"coefficients": coefficients}  # learned solver coefficients
        self.x_start, self.to_denoised = x_start, to_denoised
        self.outputs: list[Tensor] = []
        self.last_denoised: Tensor | None = None

    def advance(self, output: Tensor) -> tuple[Tensor, Tensor | None]:
        self.outputs.append(output)
        calls = 0

        def replayed_denoiser(x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
            nonlocal calls
            if calls == len(self.outputs):
                raise _NextEvaluation(x, sigma)
            self.last_denoised = self.to_denoised(self.outputs[calls], x, sigma)
            calls += 1
            return self.last_denoised

        try:
            final = self.solve(replayed_denoiser, self.x_start, self.sigmas, self.sigmas_eval, order=self.order,
                               **self.extra)
        except _NextEvaluation as pending:
            return pending.x, pending.sigma
        return final, None


def evaluation_sigmas(solver: str, order: int, sigmas: Tensor, sigmas_eval: Tensor | None) -> Tensor:
    """σ' of every denoiser call the solver makes on this grid, in call order (a dry run of the solver
    with D = 0, float64), so the timesteps follow the solver's own definition of its evaluation points."""
    called: list[Tensor] = []

    def recording_denoiser(x: Tensor, sigma: Tensor, cond: Any = None) -> Tensor:
        called.append(sigma[0])
        return torch.zeros_like(x)

    get_spec(solver).fn(recording_denoiser, torch.ones(1, dtype=torch.float64), sigmas, sigmas_eval, order=order)
    return torch.stack(called)


@dataclass
class LD3SchedulerOutput(BaseOutput):
    """``prev_sample``: the latents for the next network call (after the last step: the result at σ_N);
    ``pred_original_sample``: the denoised estimate D of the latest model output (EDM form)."""

    prev_sample: Tensor
    pred_original_sample: Tensor


class LD3Scheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler for an exported LD3 schedule; build it with :meth:`from_export`.

    Config: the step grid ``sigmas`` (N+1, EDM form), the decoupled ``sigmas_eval`` (or None), the ``solver``
    and its ``solver_order``, its learned ``coefficients`` (or None; they move no evaluation
    point), the model's ``noise_schedule`` ("vp_discrete": the beta fields as in every
    diffusers scheduler config; "edm": σ is the network's time) and ``prediction_type``. ``order`` (the
    diffusers attribute) is the number of network calls per solver step.
    """

    _compatibles: ClassVar[list[str]] = []  # no other scheduler shares this config
    order = 1

    @register_to_config
    def __init__(
        self,
        sigmas: list[float],
        solver: str,
        solver_order: int,
        sigmas_eval: list[float] | None = None,
        noise_schedule: str = "vp_discrete",
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        coefficients: list[list[float]] | None = None,
    ):
        _check_prediction_type(noise_schedule, prediction_type)
        self.step_sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        self.eval_sigmas = None if sigmas_eval is None else torch.as_tensor(sigmas_eval, dtype=torch.float64)
        self.coefficients = None if coefficients is None else torch.as_tensor(coefficients, dtype=torch.float64)
        self.schedule = noise_schedule_named(noise_schedule, self.step_sigmas, self.config)
        self.call_sigmas = evaluation_sigmas(solver, solver_order, self.step_sigmas, self.eval_sigmas)
        self.order = get_spec(solver).calls_per_step
        self.num_inference_steps = self.step_sigmas.numel() - 1
        self.timesteps = self.schedule.t_from_sigma(self.call_sigmas)
        self._replay: SolverReplay | None = None
        self._step_index: int | None = None
        self._returned: Tensor | None = None

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_export(cls, path: str | os.PathLike, scheduler_config: Mapping[str, Any] | None = None, *,
                    prediction_type: str | None = None) -> LD3Scheduler:
        """The scheduler of the export file ``path`` for a model whose own scheduler config is
        ``scheduler_config`` (``pipe.scheduler.config``: its betas and prediction type; needed for VP models).

        Checks that the export's native timesteps are this model's (an export learned for another noise
        schedule is refused).
        """
        exported = load_schedule(path)
        try:
            native_schedule(exported, scheduler_config)
        except ValueError as err:
            raise ValueError(f"{path}: {err}; pass LD3Scheduler.from_export(path, pipe.scheduler.config)") from None
        base = dict(scheduler_config or {})
        return cls(
            sigmas=exported.sigmas.tolist(), solver=exported.solver, solver_order=exported.order,
            sigmas_eval=None if exported.sigmas_eval is None else exported.sigmas_eval.tolist(),
            coefficients=None if exported.coefficients is None else exported.coefficients.tolist(),
            noise_schedule=exported.noise_schedule,
            prediction_type=prediction_type or base.get("prediction_type", "epsilon"),
            **{key: base[key] for key in _BETA_KEYS if key in base},
        )

    # ---- the diffusers contract ------------------------------------------------------------------
    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial latents: ``α σ_0`` (module docstring)."""
        sigma_max = self.step_sigmas[0]
        return float(sigma_max * self._alpha(sigma_max))

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int:
        return 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Only 0: a learned schedule starts at its σ_max (image-to-image starts mid-schedule: unsupported)."""
        if begin_index != 0:
            raise ValueError(f"LD3Scheduler cannot start at step {begin_index}: a learned schedule runs from its σ_max "
                             "(image-to-image with strength < 1 is not supported)")

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """Reset for a new solve; ``num_inference_steps`` must be the export's N (or None)."""
        if num_inference_steps is not None and num_inference_steps != self.num_inference_steps:
            raise ValueError(
                f"this LD3Scheduler runs the exported {self.num_inference_steps}-step {self.config.solver} grid "
                f"({self.timesteps.numel()} network calls); call the pipeline with num_inference_steps="
                f"{self.num_inference_steps} (other step counts: `python -m pipeline.export_cli interpolate`)"
            )
        self.timesteps = self.timesteps.to(device)
        self._replay, self._step_index, self._returned = None, 0, None

    def scale_model_input(self, sample: Tensor, timestep: float | Tensor | None = None) -> Tensor:
        """The identity: the latents already are the network's input (module docstring)."""
        return sample

    def step(self, model_output: Tensor, timestep: float | Tensor, sample: Tensor, generator: Any = None,
             return_dict: bool = True) -> LD3SchedulerOutput | tuple[Tensor, Tensor]:
        """Record the network's output at ``timestep`` and advance the solver to its next evaluation.

        ``generator`` is accepted for pipelines that pass one and unused (the ODE solve is deterministic).
        """
        self._check_step(timestep, sample)
        work_dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        if self._replay is None:
            x_start = sample.to(work_dtype) / self._alpha(self.step_sigmas[0].to(work_dtype))
            coefficients = None if self.coefficients is None else self.coefficients.to(work_dtype)
            self._replay = SolverReplay(self.config.solver, self.config.solver_order, self.step_sigmas,
                                        self.eval_sigmas, x_start, self._to_denoised, coefficients)
        x_next, sigma_next = self._replay.advance(model_output)
        prev_sample = x_next if sigma_next is None else x_next * self._alpha(sigma_next).reshape(-1, *[1] * (x_next.ndim - 1))
        self._returned = prev_sample.to(sample.dtype)
        self._step_index += 1
        denoised = self._replay.last_denoised.to(sample.dtype)
        return LD3SchedulerOutput(self._returned, denoised) if return_dict else (self._returned, denoised)

    # ---- helpers ---------------------------------------------------------------------------------
    def _alpha(self, sigma: Tensor) -> Tensor:
        """α(σ) = 1/sqrt(1 + σ²) for VP models (the adapters' ``x_vp = α x``), 1 for EDM/VE."""
        return torch.rsqrt(1 + sigma * sigma) if self.config.noise_schedule == "vp_discrete" else torch.ones_like(sigma)

    def _to_denoised(self, output: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        return x0_from_prediction(output.to(x.dtype), x, sigma, self.config.prediction_type)

    def _check_step(self, timestep: float | Tensor, sample: Tensor) -> None:
        if self._step_index is None:
            raise ValueError("call set_timesteps() before step() (the pipelines do)")
        if self._step_index >= self.timesteps.numel():
            raise ValueError(f"step() called more than the schedule's {self.timesteps.numel()} network calls; "
                             "call set_timesteps() to start a new solve")
        expected = float(self.timesteps[self._step_index])
        if not math.isclose(float(timestep), expected, rel_tol=1e-6, abs_tol=1e-6):
            raise ValueError(f"step() got timestep {float(timestep):.6g}, but call {self._step_index} of the schedule "
                             f"is at {expected:.6g}; pass the scheduler's own timesteps in order")
        if self._returned is not None and not torch.equal(sample, self._returned):
            raise ValueError("the latents passed to step() differ from those the previous step returned; LD3Scheduler "
                             "steps its solver from its own state, so editing latents between steps is not supported")


def _check_prediction_type(noise_schedule: str, prediction_type: str) -> None:
    allowed = EDM_PREDICTION_TYPES if noise_schedule == "edm" else PREDICTION_TYPES
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported for {noise_schedule} models; "
                         f"use one of {allowed}")
