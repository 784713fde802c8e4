"""Exported schedules: one JSON file per (model, solver, order, NFE) for ld3 solvers and diffusers.

A file holds (schema version 1):
  ``schema_version``, ``model``, ``solver``, ``order``, ``nfe``, ``n_steps``, ``noise_schedule`` (the
  ``NoiseSchedule.name`` whose native time ``timesteps`` are in), ``mode`` (``"lambda"``/``"time"`` for a
  learned grid, the baseline's name for a fixed one, ``"interpolated"`` for one resized by
  ``interpolated_export``: not learned), ``decoupled``;
  ``sigmas`` (N+1, descending, σ_max … σ_min, EDM form), ``sigmas_eval`` (N+1 decoupled evaluation
  points, or null), ``timesteps`` / ``timesteps_eval`` (the same points in the model's native time,
  ``schedule.t_from_sigma``), ``metrics`` and ``provenance`` (MLflow run id, study, teacher cache key,
  config, code version, creation time in UTC), ``source`` (``"learned"`` or ``"baseline:<name>"``: a study
  exports the best schedule it measured for a cell, which is a baseline grid where no learned one beat it),
  ``learned_beats_baseline`` (true, false, or null where no learned schedule finished) and ``consumers``
  (derived from the grid, checked on load, optional: what k-diffusion-style samplers, ComfyUI and diffusers
  schedulers take, see ``ExportedSchedule.consumer_formats``; docs/exports.md shows each in use); optional
  ``coefficients`` ([N, slots] learned corrections of the solver's weights, docs/method.md#learned-coefficients;
  absent when none were learned; only ``ld3.sampling.sample`` and the ``LD3Scheduler`` can honour them).

A study writes its files to ``<exports_dir>/<study>/`` (``study_exports_dir``) with ``save_best_export``,
which keeps an existing file that scored better on the same teacher data instead of replacing it.

``load_schedule(path)`` validates a file (schema and keys; a known solver, its order and the NFE it spends
on the grid; a known noise schedule and native times that fit the σ; σ within ``SIGMA_RANGE``; one-line
errors that name the file) and returns an ``ExportedSchedule``: ``.sigmas`` /
``.sigmas_eval`` are float64 tensors for ``ld3.solvers``; ``diffusers_sigmas()`` and
``diffusers_timesteps()`` give the lists diffusers schedulers accept (their conventions are in the
method docstrings).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ld3.schedules import EDMSchedule, NoiseSchedule, VPCosineSchedule, VPDiscreteSchedule, VPLinearSchedule
from ld3.solvers import coefficient_shape
from ld3.solvers import nfe as solver_nfe
from pipeline.fileio import atomic_write_text, ensure_writable_dir
from pipeline.provenance import code_version, jsonable

if TYPE_CHECKING:
    from pipeline.tracking import StudyTracker, TrialLogger

SCHEMA_VERSION = 1
DIFFUSERS_TIME_SCHEDULES = ("vp_discrete",)  # native time = diffusers' training-step index
EXPORTS_ARTIFACT_DIR = "exports"
NOISE_SCHEDULES = tuple(c.name for c in (EDMSchedule, VPLinearSchedule, VPCosineSchedule, VPDiscreteSchedule))
SIGMA_RANGE = (1e-5, 1e4)  # EDM-form σ of every published diffusion model lies inside (VE's largest: ~1350)
_CONTINUOUS_TIME = (VPLinearSchedule.name, VPCosineSchedule.name)  # native time in (0, 1]
INTERPOLATED_MODE = "interpolated"  # mode of a schedule resized by interpolated_export (not learned)
# Who can evaluate the denoiser at sigmas_eval (decoupled schedules); every other consumer takes the step grid only.
HONOURS_SIGMAS_EVAL = ("ld3.sampling.sample", "pipeline.consumers.diffusers_scheduler.LD3Scheduler")
HONOURS_COEFFICIENTS = HONOURS_SIGMAS_EVAL  # who can run the solver with learned coefficient corrections
K_DIFFUSION, COMFYUI, DIFFUSERS_SCHEDULERS = "k-diffusion samplers", "ComfyUI custom sigmas", "diffusers' built-in schedulers"
STEP_GRID_CONSUMERS = (K_DIFFUSION, COMFYUI, DIFFUSERS_SCHEDULERS)  # they evaluate at their step points
# Nearest ComfyUI / k-diffusion-style sampler of each (solver, order): same method, warm-up details may differ.
COMFYUI_SAMPLERS = {("euler", 1): "euler", ("heun", 2): "heun", ("dpm_solver_2", 2): "dpm_2", ("dpmpp", 2): "dpmpp_2m",
                    ("unipc_bh1", 3): "uni_pc", ("unipc_bh2", 3): "uni_pc_bh2", ("ipndm", 4): "ipndm"}

_TOP_LEVEL_KEYS = (
    "schema_version", "model", "solver", "order", "nfe", "n_steps", "noise_schedule", "mode", "decoupled",
    "sigmas", "sigmas_eval", "timesteps", "timesteps_eval", "metrics", "provenance",
)
_OPTIONAL_KEYS = ("source", "learned_beats_baseline")  # files written before they existed read as "learned"/null
_PROVENANCE_KEYS = ("mlflow_run_id", "study", "teacher_cache_key", "config", "code_version", "created")


@dataclass(frozen=True)
class Provenance:
    """Where an exported schedule comes from."""

    teacher_cache_key: str
    config: dict[str, Any]
    mlflow_run_id: str | None = None
    study: str | None = None
    code_version: str = field(default_factory=code_version)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        _require(isinstance(self.teacher_cache_key, str) and self.teacher_cache_key,
                 "provenance.teacher_cache_key", "must be a non-empty string")
        _require(isinstance(self.config, dict), "provenance.config", "must be a JSON object (dict)")
        for name in ("mlflow_run_id", "study"):
            _require(getattr(self, name) is None or isinstance(getattr(self, name), str),
                     f"provenance.{name}", "must be a string or null")
        _require(isinstance(self.code_version, str), "provenance.code_version", "must be a string")
        try:
            datetime.fromisoformat(self.created)
        except (TypeError, ValueError):
            raise ValueError(f"provenance.created={self.created!r} must be an ISO-8601 timestamp") from None


@dataclass(frozen=True, eq=False)
class ExportedSchedule:
    """A validated exported schedule; tensors are float64 on the CPU (move them with ``.to``)."""

    model: str
    solver: str
    order: int
    nfe: int
    noise_schedule: str
    mode: str
    sigmas: Tensor
    timesteps: Tensor
    metrics: dict[str, float]
    provenance: Provenance
    sigmas_eval: Tensor | None = None
    timesteps_eval: Tensor | None = None
    source: str = "learned"  # or "baseline:<name>" when a baseline grid beat every learned schedule
    learned_beats_baseline: bool | None = None  # None: no learned schedule to compare
    coefficients: Tensor | None = None  # learned corrections [N, slots] (ld3.solvers.coefficient_shape)

    def __post_init__(self) -> None:
        _require(self.source == "learned" or (self.source.startswith("baseline:") and len(self.source) > 9), "source",
                 f"must be 'learned' or 'baseline:<name>', got {self.source!r}")
        _require(self.learned_beats_baseline in (None, True, False), "learned_beats_baseline", "must be true, false or null")
        for name in ("model", "solver", "noise_schedule", "mode"):
            _require(isinstance(getattr(self, name), str) and getattr(self, name), name, "must be a non-empty string")
        for name in ("order", "nfe"):
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                     f"must be an integer >= 1, got {value!r}")
        _require(self.noise_schedule in NOISE_SCHEDULES, "noise_schedule",
                 f"{self.noise_schedule!r} is unknown; one of {NOISE_SCHEDULES}")
        _check_grid(self.sigmas, "sigmas", positive=True, strict=True)
        n_points = self.sigmas.numel()
        _check_grid(self.timesteps, "timesteps", strict=True, length=n_points)
        _check_solver_nfe(self.solver, self.order, self.nfe, n_points - 1)
        _check_times_match_sigmas(self.noise_schedule, self.sigmas, self.timesteps, "")
        _require((self.sigmas_eval is None) == (self.timesteps_eval is None), "timesteps_eval",
                 "must be given exactly when sigmas_eval is")
        if self.sigmas_eval is not None:
            _check_grid(self.sigmas_eval, "sigmas_eval", positive=True, strict=False, length=n_points)
            _check_grid(self.timesteps_eval, "timesteps_eval", strict=False, length=n_points)
            _check_times_match_sigmas(self.noise_schedule, self.sigmas_eval, self.timesteps_eval, "_eval")
            same_ends = torch.allclose(self.sigmas_eval[[0, -1]], self.sigmas[[0, -1]], rtol=1e-6, atol=0.0)
            _require(same_ends, "sigmas_eval", "must share its first and last values with sigmas (endpoints are masked)")
        _require(isinstance(self.metrics, dict) and all(isinstance(k, str) for k in self.metrics), "metrics",
                 "must map names to numbers")
        for key, value in self.metrics.items():
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                     f"metrics[{key!r}]", f"must be a finite number, got {value!r}")
        _require(isinstance(self.provenance, Provenance), "provenance", "must be a Provenance")
        if self.coefficients is not None:
            _check_coefficients(self.coefficients, self.solver, self.order, n_points - 1)

    @property
    def n_steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def decoupled(self) -> bool:
        return self.sigmas_eval is not None

    @property
    def file_name(self) -> str:
        return export_file_name(self.model, self.solver, self.order, self.nfe)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model, "solver": self.solver, "order": self.order, "nfe": self.nfe,
            "n_steps": self.n_steps, "noise_schedule": self.noise_schedule, "mode": self.mode,
            "decoupled": self.decoupled,
            "sigmas": self.sigmas.tolist(),
            "sigmas_eval": None if self.sigmas_eval is None else self.sigmas_eval.tolist(),
            "timesteps": self.timesteps.tolist(),
            "timesteps_eval": None if self.timesteps_eval is None else self.timesteps_eval.tolist(),
            "metrics": dict(self.metrics),
            "source": self.source,
            "learned_beats_baseline": self.learned_beats_baseline,
            "provenance": {name: getattr(self.provenance, name) for name in _PROVENANCE_KEYS},
            "consumers": self.consumer_formats(),
            **({} if self.coefficients is None else {"coefficients": self.coefficients.tolist()}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, document: Any) -> ExportedSchedule:
        """Validate a parsed export (schema version, keys, lengths, monotonicity) and build it."""
        _require(isinstance(document, dict), "document", "must be a JSON object")
        document = dict(document)
        consumers = document.pop("consumers", None)  # optional, derived from the grid (consumer_formats)
        coefficients = document.pop("coefficients", None)  # optional: learned solver coefficients
        version = document.get("schema_version")
        _require(version == SCHEMA_VERSION, "schema_version",
                 f"is {version!r}, this code reads version {SCHEMA_VERSION}; re-export with this version of the code")
        _check_keys(document, _TOP_LEVEL_KEYS, "", optional=_OPTIONAL_KEYS)
        _check_keys(document["provenance"], _PROVENANCE_KEYS, "provenance.")
        exported = cls(
            model=document["model"], solver=document["solver"], order=document["order"], nfe=document["nfe"],
            noise_schedule=document["noise_schedule"], mode=document["mode"],
            sigmas=_tensor(document["sigmas"], "sigmas"),
            sigmas_eval=None if document["sigmas_eval"] is None else _tensor(document["sigmas_eval"], "sigmas_eval"),
            timesteps=_tensor(document["timesteps"], "timesteps"),
            timesteps_eval=None if document["timesteps_eval"] is None else _tensor(document["timesteps_eval"], "timesteps_eval"),
            metrics=document["metrics"],
            provenance=Provenance(**document["provenance"]),
            source=document.get("source", "learned"),
            learned_beats_baseline=document.get("learned_beats_baseline"),
            coefficients=None if coefficients is None else _tensor(coefficients, "coefficients"),
        )
        _require(document["n_steps"] == exported.n_steps, "n_steps",
                 f"is {document['n_steps']!r} but sigmas has {exported.n_steps + 1} points (n_steps + 1 expected)")
        _require(document["decoupled"] == exported.decoupled, "decoupled",
                 f"is {document['decoupled']!r} but sigmas_eval is {'set' if exported.decoupled else 'null'}")
        _require(consumers is None or consumers == exported.consumer_formats(), "consumers",
                 "does not match sigmas (was the file edited?); delete the consumers block or re-export")
        return exported

    # ---------------------------------------------------------------------------------------------
    # diffusers

    def diffusers_sigmas(self, *, final: str = "sigma_min", ignore_decoupled: bool = False) -> list[float]:
        """The N+1 values for ``EulerDiscreteScheduler.set_timesteps(sigmas=...)``.

        That argument is used as given: the model is evaluated at the first N values and the last one is
        the final σ (diffusers appends nothing on this path; it maps σ to timesteps by log-σ
        interpolation, exactly as ``VPDiscreteSchedule`` does). ``final="sigma_min"`` keeps σ_N, the
        grid LD3 learned; ``final="zero"`` makes the last step land on σ = 0 instead. Only schedules
        whose σ is diffusers' ``sqrt((1 - ᾱ) / ᾱ)`` (discrete VP) mean the same thing there.
        """
        self._check_diffusers(ignore_decoupled)
        if final not in ("sigma_min", "zero"):
            raise ValueError(f"final={final!r} must be 'sigma_min' (keep σ_N) or 'zero' (step to σ = 0)")
        values = self.sigmas.tolist()
        return values if final == "sigma_min" else values[:-1] + [0.0]

    def diffusers_timesteps(self, *, integer: bool = True, ignore_decoupled: bool = False) -> list[int] | list[float]:
        """The N timesteps for ``set_timesteps(timesteps=...)`` (EulerDiscrete, Heun, DPMSolverMultistep, …).

        These are the native times of σ_0 … σ_{N-1}, where the model is evaluated; the scheduler appends
        its own final σ from ``final_sigmas_type`` ("sigma_min" = σ at t = 0, which is this grid's σ_N;
        "zero", the usual default, steps to σ = 0). Schedulers interpolate σ linearly between integer
        timesteps, so only integer timesteps reproduce σ exactly; ``integer=True`` rounds to the nearest
        step (DPMSolver* would otherwise truncate with ``astype(int64)``).
        """
        self._check_diffusers(ignore_decoupled)
        if self.noise_schedule not in DIFFUSERS_TIME_SCHEDULES:
            raise ValueError(
                f"noise_schedule {self.noise_schedule!r} has no diffusers training-step timesteps "
                f"(only {DIFFUSERS_TIME_SCHEDULES}); use diffusers_sigmas() or .sigmas instead"
            )
        times = self.timesteps[:-1]
        if not integer:
            return times.tolist()
        rounded = torch.round(times).long()
        if bool((rounded[1:] >= rounded[:-1]).any()):
            raise ValueError(
                f"two steps of this grid round to the same integer timestep ({rounded.tolist()}); "
                "pass integer=False or use diffusers_sigmas() with EulerDiscreteScheduler"
            )
        return rounded.tolist()

    def _check_diffusers(self, ignore_decoupled: bool) -> None:
        self.check_step_grid_consumer(DIFFUSERS_SCHEDULERS, ignore_decoupled)

    # ---------------------------------------------------------------------------------------------
    # k-diffusion, ComfyUI and the consumers block of the file

    def k_diffusion_sigmas(self, *, ignore_decoupled: bool = False) -> list[float]:
        """The N+1 σ of k-diffusion-style samplers (``sample_euler(model, x, sigmas)``, ComfyUI's SIGMAS):
        σ_0 … σ_{N-1} and a final 0, in the model's native σ (for VP models ``sqrt((1 - ᾱ)/ᾱ)``, the EDM σ
        those samplers use). N steps as learned; the last one lands on σ = 0 instead of σ_N."""
        self.check_step_grid_consumer(K_DIFFUSION, ignore_decoupled)
        return self.sigmas[:-1].tolist() + [0.0]

    def comfyui_sigmas(self, *, ignore_decoupled: bool = False) -> str:
        """:meth:`k_diffusion_sigmas` as the comma-separated string ComfyUI's custom-sigmas nodes (ManualSigmas)
        parse; every value is written with Python's shortest exact repr, so parsing it back is lossless."""
        self.check_step_grid_consumer(COMFYUI, ignore_decoupled)
        return ", ".join(repr(value) for value in self.k_diffusion_sigmas(ignore_decoupled=True))

    def check_step_grid_consumer(self, consumer: str, ignore_decoupled: bool) -> None:
        """Refuse to hand a decoupled schedule to ``consumer`` (one that evaluates at its step points) unless the
        caller chose to drop the decoupling (``ignore_decoupled=True``); refuse learned coefficients always."""
        if self.coefficients is not None:
            raise ValueError(
                f"this schedule carries learned solver coefficients, which {consumer} cannot apply; "
                f"run it with {' or '.join(HONOURS_COEFFICIENTS)}, "
                "or export a schedule trained without learn_coefficients"
            )
        if self.decoupled and not ignore_decoupled:
            raise ValueError(
                f"this schedule is decoupled (the denoiser is evaluated at sigmas_eval, not at sigmas) and {consumer} "
                f"evaluate at their step points; consumers that cannot honour sigmas_eval: {', '.join(STEP_GRID_CONSUMERS)}; "
                f"that can: {', '.join(HONOURS_SIGMAS_EVAL)}; pass ignore_decoupled=True (CLI: --ignore-decoupled) to "
                "use the step grid alone (its quality then differs from the exported metrics)"
            )

    def consumer_formats(self) -> dict[str, Any]:
        """What other samplers take, as stored in the file's ``consumers`` block (derived from the grid).

        For a decoupled schedule the lists are the step grid alone (``step_grid_only``: they lose the
        decoupling); ``honours_sigmas_eval`` names the consumers that keep it. With learned coefficients no
        step-grid consumer can reproduce the solver, so the lists are null.
        """
        if self.coefficients is not None:
            lists = dict.fromkeys(("k_diffusion_sigmas", "comfyui_sigmas", "diffusers_sigmas", "diffusers_timesteps"))
            return {"solver": self.solver, "order": self.order, "comfyui_sampler": None,
                    "step_grid_only": self.decoupled, "honours_sigmas_eval": list(HONOURS_SIGMAS_EVAL), **lists}
        try:
            timesteps = self.diffusers_timesteps(ignore_decoupled=True)
        except ValueError:  # no training-step time (EDM/VE), or two steps round to the same integer
            timesteps = None
        return {
            "solver": self.solver, "order": self.order,
            "comfyui_sampler": COMFYUI_SAMPLERS.get((self.solver, self.order)),
            "step_grid_only": self.decoupled,
            "honours_sigmas_eval": list(HONOURS_SIGMAS_EVAL),
            "k_diffusion_sigmas": self.k_diffusion_sigmas(ignore_decoupled=True),
            "comfyui_sigmas": self.comfyui_sigmas(ignore_decoupled=True),
            "diffusers_sigmas": self.diffusers_sigmas(ignore_decoupled=True),
            "diffusers_timesteps": timesteps,
        }


# --------------------------------------------------------------------------------------------------
# Building, writing, loading


def build_export(
    *,
    sigmas: Tensor,
    noise_schedule: NoiseSchedule,
    model: str,
    solver: str,
    order: int,
    nfe: int,
    mode: str,
    metrics: dict[str, float],
    config: Any,
    teacher_cache_key: str,
    sigmas_eval: Tensor | None = None,
    mlflow_run_id: str | None = None,
    study: str | None = None,
    source: str = "learned",
    learned_beats_baseline: bool | None = None,
    coefficients: Tensor | None = None,
) -> ExportedSchedule:
    """An export of the grid ``sigmas`` (and decoupled ``sigmas_eval``, learned solver ``coefficients``), with
    native timesteps from ``noise_schedule.t_from_sigma`` and provenance (code version and time filled in)."""
    sigmas = _tensor(sigmas, "sigmas")
    noise_schedule.check_sigmas(sigmas, "sigmas")
    evals = None if sigmas_eval is None else _tensor(sigmas_eval, "sigmas_eval")
    if evals is not None:
        noise_schedule.check_sigmas(evals, "sigmas_eval")
    return ExportedSchedule(
        model=model, solver=solver, order=int(order), nfe=int(nfe), noise_schedule=noise_schedule.name, mode=mode,
        sigmas=sigmas, timesteps=noise_schedule.t_from_sigma(sigmas),
        sigmas_eval=evals, timesteps_eval=None if evals is None else noise_schedule.t_from_sigma(evals),
        metrics={str(k): float(v) for k, v in metrics.items()},
        provenance=Provenance(teacher_cache_key=teacher_cache_key, config=jsonable(config),
                              mlflow_run_id=mlflow_run_id, study=study),
        source=source, learned_beats_baseline=learned_beats_baseline,
        coefficients=None if coefficients is None else _tensor(coefficients, "coefficients"),
    )


def export_file_name(model: str, solver: str, order: int, nfe: int) -> str:
    """Stable file name of the export for one (model, solver, order, NFE), e.g. ``gmm__ipndm-o4__nfe6.json``."""
    return f"{_slug(model)}__{_slug(solver)}-o{int(order)}__nfe{int(nfe)}.json"


def save_export(
    exported: ExportedSchedule,
    exports_dir: str | os.PathLike,
    *,
    tracker: StudyTracker | TrialLogger | None = None,
) -> Path:
    """Write ``exported`` atomically to ``exports_dir/<file_name>`` (replacing an earlier export of the same
    model/solver/order/NFE) and, with ``tracker``, log the file to its run under ``exports/``."""
    directory = ensure_writable_dir(exports_dir, "exports_dir")
    path = atomic_write_text(directory / exported.file_name, exported.to_json())
    if tracker is not None:
        tracker.log_artifact(path, EXPORTS_ARTIFACT_DIR)
    return path


def load_schedule(path: str | os.PathLike) -> ExportedSchedule:
    """Read and validate an exported schedule; errors name the file and the offending field."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"exported schedule {path} does not exist; pass a file written by save_export") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 JSON text file (byte {err.start} is {err.object[err.start]:#04x}); "
                         "pass a .json file written by save_export") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        return ExportedSchedule.from_dict(document)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def noise_schedule_named(name: str, sigmas: Tensor, scheduler_config: Mapping[str, Any] | None = None) -> NoiseSchedule:
    """The noise schedule ``name`` of an export with grid ``sigmas``: EDM/VE (time is σ) or discrete VP built from
    the model's diffusers scheduler config (its betas)."""
    if name == "edm":
        return EDMSchedule(sigma_min=float(sigmas.min()), sigma_max=float(sigmas.max()))
    if name != "vp_discrete":
        raise ValueError(f"noise_schedule {name!r} is not supported here (only edm and vp_discrete: diffusers has no "
                         "pipelines for continuous-time VP models); sample with ld3.sampling.sample")
    if scheduler_config is None:
        raise ValueError("a vp_discrete schedule needs the model's scheduler config for its betas "
                         "(pipe.scheduler.config, or the file scheduler/scheduler_config.json of the model)")
    from ld3.models.diffusers_models import schedule_from_scheduler_config

    schedule = schedule_from_scheduler_config(scheduler_config)
    schedule.check_sigmas(sigmas, "sigmas")
    return schedule


def native_schedule(exported: ExportedSchedule, scheduler_config: Mapping[str, Any] | None = None) -> NoiseSchedule:
    """:func:`noise_schedule_named` of an export, refusing a scheduler config whose timesteps are not the export's."""
    schedule = noise_schedule_named(exported.noise_schedule, exported.sigmas, scheduler_config)
    gap = float((schedule.t_from_sigma(exported.sigmas) - exported.timesteps).abs().max())
    if gap > 1e-6 * max(1.0, float(exported.timesteps.abs().max())):
        raise ValueError(f"the export's timesteps differ from this model's by up to {gap:.4g}; it was learned for a model "
                         "with another noise schedule (check the scheduler config)")
    return schedule


def loglinear_interpolation(sigmas: Tensor, n_steps: int) -> Tensor:
    """``n_steps + 1`` values: log σ interpolated linearly over the normalised step index i/N (as Align Your
    Steps resizes its schedules); both endpoints are kept exactly."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    log_sigmas = sigmas.to(torch.float64).log()
    position = torch.linspace(0, log_sigmas.numel() - 1, n_steps + 1, dtype=torch.float64)
    left = position.floor().long().clamp(max=log_sigmas.numel() - 2)
    fraction = position - left
    resized = torch.exp(log_sigmas[left] + fraction * (log_sigmas[left + 1] - log_sigmas[left]))
    resized[[0, -1]] = sigmas[[0, -1]].to(torch.float64)
    return resized


def interpolated_export(exported: ExportedSchedule, n_steps: int, schedule: NoiseSchedule, source: str) -> ExportedSchedule:
    """``exported`` resized to ``n_steps`` steps by :func:`loglinear_interpolation` (σ and σ_eval alike), labelled
    as not learned: ``mode`` is ``"interpolated"``, no metrics, the origin in ``provenance.config``. Learned solver
    coefficients belong to their grid's steps and cannot be resized: such an export is refused."""
    from ld3.solvers.registry import get_spec

    if exported.coefficients is not None:
        raise ValueError(f"{source} carries learned solver coefficients, one row per step of its {exported.n_steps}-step "
                         f"grid, which interpolation cannot resize; run it at {exported.n_steps} steps with "
                         f"{' or '.join(HONOURS_COEFFICIENTS)}")

    return build_export(
        sigmas=loglinear_interpolation(exported.sigmas, n_steps),
        sigmas_eval=None if exported.sigmas_eval is None else loglinear_interpolation(exported.sigmas_eval, n_steps),
        noise_schedule=schedule, model=exported.model, solver=exported.solver, order=exported.order,
        nfe=get_spec(exported.solver).calls_per_step * n_steps, mode=INTERPOLATED_MODE, metrics={},
        config={"not_learned": f"log-sigma interpolation of {source} ({exported.n_steps} steps, mode {exported.mode}) "
                               f"to {n_steps} steps", "source_config": exported.provenance.config},
        teacher_cache_key=exported.provenance.teacher_cache_key, study=exported.provenance.study,
    )


@dataclass(frozen=True)
class SaveOutcome:
    """What ``save_best_export`` did: ``written`` False means an existing, better file was kept."""

    path: Path
    written: bool
    note: str  # one line for the console; empty when a new file was written where there was none


def study_exports_dir(exports_dir: str | os.PathLike, study: str) -> Path:
    """``<exports_dir>/<study>``: each study's exports in their own folder, so studies never overwrite each other."""
    return Path(exports_dir) / _slug(study)


def save_best_export(
    exported: ExportedSchedule,
    exports_dir: str | os.PathLike,
    *,
    metric: str = "final_val_loss",
    tracker: StudyTracker | TrialLogger | None = None,
) -> SaveOutcome:
    """Like ``save_export``, but an existing file of the same cell whose ``metric`` on the same teacher data is
    at least as good is kept (the new one is not written); the outcome says what happened and why."""
    path = Path(exports_dir) / exported.file_name
    new_value = exported.metrics[metric]
    old = _existing_export(path)
    note = ""
    if isinstance(old, str):
        note = f"replaced {path} ({old})"
    elif old is not None:
        old_value = old.metrics.get(metric)
        same_data = old.provenance.teacher_cache_key == exported.provenance.teacher_cache_key
        if same_data and old_value is not None and old_value <= new_value:
            note = "" if old_value == new_value else (f"kept {path}: its {metric} {old_value:.4g} (run "
                                                      f"{old.provenance.mlflow_run_id}) beats this run's {new_value:.4g}")
            return SaveOutcome(path, False, note)  # a rerun that measured the same: nothing to say
        note = (f"replaced {path}: {metric} {old_value:.4g} -> {new_value:.4g}" if same_data and old_value is not None
                else f"replaced {path}, whose {metric} was measured on other teacher data")
    return SaveOutcome(save_export(exported, exports_dir, tracker=tracker), True, note)


def _existing_export(path: Path) -> ExportedSchedule | str | None:
    """The valid export at ``path``, None if there is none, or why the file there cannot be read."""
    if not path.exists():
        return None
    try:
        return load_schedule(path)
    except (OSError, ValueError) as err:
        return f"it was not a valid export: {str(err).splitlines()[0]}"


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    if not slug:
        raise ValueError(f"name {text!r} has no letters or digits to build a file name from")
    return slug


def _check_coefficients(values: Tensor, solver: str, order: int, n_steps: int) -> None:
    """Learned coefficient corrections: the solver takes them, and they are finite of shape [N, slots]."""
    try:
        shape = coefficient_shape(solver, n_steps, order)
    except ValueError as err:
        raise ValueError(f"coefficients {err}") from None
    _require(tuple(values.shape) == shape, "coefficients",
             f"must have shape {list(shape)} for {solver} order {order} on {n_steps} steps, got {list(values.shape)}")
    _require(bool(torch.isfinite(values).all()), "coefficients", "must be finite numbers")


def _require(condition: bool, name: str, problem: str) -> None:
    if not condition:
        raise ValueError(f"{name} {problem}")


def _check_keys(document: Any, expected: tuple[str, ...], prefix: str, optional: tuple[str, ...] = ()) -> None:
    _require(isinstance(document, dict), prefix.rstrip(".") or "document", "must be a JSON object")
    missing = [k for k in expected if k not in document]
    unknown = sorted(k for k in document if k not in expected + optional)
    _require(not missing, f"{prefix}{missing[0] if missing else ''}", "is missing")
    _require(not unknown, f"{prefix}{unknown[0] if unknown else ''}",
             f"is not a field of schema version {SCHEMA_VERSION} (fields: {', '.join(expected + optional)})")


def _tensor(values: Any, name: str) -> Tensor:
    try:
        tensor = torch.as_tensor(values.detach() if isinstance(values, Tensor) else values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a list of numbers") from None
    return tensor.cpu().clone()


def _check_grid(values: Tensor, name: str, *, strict: bool, positive: bool = False, length: int | None = None) -> None:
    """1-D, finite, descending (strictly if ``strict``), optionally positive and of a given length."""
    _require(isinstance(values, Tensor) and values.ndim == 1 and values.numel() >= 2, name,
             "must be a 1-D list of at least 2 numbers (N+1 grid points)")
    _require(length is None or values.numel() == length, name,
             f"has {values.numel()} points but sigmas has {length}; all grids need N+1 points")
    _require(bool(torch.isfinite(values).all()), name, "contains NaN or infinite values")
    _require(not positive or bool((values > 0).all()), name, f"must be positive, min is {float(values.min()):.6g}")
    steps = values[1:] - values[:-1]
    descending = bool((steps < 0).all()) if strict else bool((steps <= 0).all())
    _require(descending, name, f"must be {'strictly ' if strict else ''}descending (from sigma_max to sigma_min)")
    if positive:
        low, high = SIGMA_RANGE
        _require(bool(((values >= low) & (values <= high)).all()), name,
                 f"has values from {float(values.min()):.6g} to {float(values.max()):.6g}, outside [{low:g}, {high:g}] "
                 "where diffusion models' sigmas lie")


def _check_solver_nfe(solver: str, order: int, nfe: int, n_steps: int) -> None:
    """The solver exists, takes ``order`` and spends exactly ``nfe`` denoiser calls on ``n_steps`` steps."""
    try:
        calls = solver_nfe(solver, n_steps, order)
    except ValueError as err:
        raise ValueError(f"solver/order: {err}") from None
    _require(calls == nfe, "nfe", f"is {nfe} but {solver} spends {calls} denoiser calls on {n_steps} steps")


def _check_times_match_sigmas(noise_schedule: str, sigmas: Tensor, timesteps: Tensor, suffix: str) -> None:
    """Native times consistent with the σ grid: equal to σ for EDM, inside the schedule's time range for VP
    (their parameters are not in the file, so VP times are checked for range only)."""
    name = f"timesteps{suffix}"
    if noise_schedule == EDMSchedule.name:
        _require(torch.allclose(timesteps, sigmas, rtol=1e-9, atol=0.0), name,
                 f"must equal sigmas{suffix} for the edm schedule (native time is sigma)")
    elif noise_schedule in _CONTINUOUS_TIME:
        _require(bool(((timesteps > 0) & (timesteps <= 1)).all()), name,
                 f"must lie in (0, 1] for the {noise_schedule} schedule")
    else:
        _require(bool((timesteps >= 0).all()), name, f"must be >= 0 (training-step indices) for {noise_schedule}")
