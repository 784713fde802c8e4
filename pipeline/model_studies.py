"""What the per-model study scripts (``studies/cifar10.py`` ... ``studies/sd15.py``) share.

- The paper's recipes (docs/method.md): :func:`pixel_study` (EDM pickles: UniPC bh1-3 and iPNDM-4, NFE 4/6/8/10,
  teacher UniPC-3 NFE 20 on EDM rho=7, train batch 2, rounds 2+5, lr2 = 0.1/N) and :func:`latent_study`
  (latent models: UniPC bh2-3 and iPNDM-4, NFE 4/5/6/7, train batch 1, rounds 2+3, lr2 = 0.001/N); both
  50 + 50 teacher samples (25 + 25 prompts for text models) and the LPIPS loss.
- :class:`ModelStudy`: a script's command line (``--checkpoint`` with an environment-variable fallback,
  memory options, class labels / prompts) and ``make_config``, which checks everything about the model
  *before* Ray starts, so bad input ends in one line, exit code 2, and nothing written: the checkpoint
  exists and fits the family, the network makes the images the study expects, the conditioning fits the
  network, the LPIPS weights are on disk, and GPUs are visible when the study asks for them.
- ``--smoke-test``: :func:`smoke_variant` of the study (1 solver, 1 NFE, 2 trials, 4 + 4 samples,
  1 + 1 rounds, L2 loss, CPU) on a tiny random checkpoint of the same family (pipeline.models.smoke).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ld3.checkpoint_sources import SD_EXAMPLE_REPO, TRUST_ENV_VAR, TRUST_FLAG, WEIGHTS_DTYPE_NAMES, MissingWeightsError
from ld3.config import LD3Config
from pipeline.cli import build_parser
from pipeline.cli import main as cli_main
from pipeline.models.spec import ModelSpec
from pipeline.search.space import SearchSpace, SolverChoice
from pipeline.study_config import StudyConfig, bundle_search
from pipeline.teacher.config import TeacherConfig

if TYPE_CHECKING:
    from pipeline.models.registry import ConditionValue

CLASS_FAMILIES = ("edm", "diffusers_pixel", "diffusers_latent")  # families whose networks may take class ids
DIFFUSERS_FAMILIES = ("diffusers_pixel", "diffusers_latent", "stable_diffusion")
# Trials per LD3Bundle of a GPU study with --cuda-graphs: the best K measured on an H200 (bench/RESULTS.md, "issue 20,
# second pass": 225 / 324 / 402 / 543 / 620 trials per hour for K = 1 / 2 / 4 / 8 / 16, peak memory ~23 GiB at each).
GPU_TRIALS_PER_BUNDLE = 16


# ---------------------------------------------------------------------------------------------
# The paper's recipes
# ---------------------------------------------------------------------------------------------
def pixel_study(name: str, model: ModelSpec) -> StudyConfig:
    """The paper's recipe for pixel-space models (docs/method.md)."""
    return StudyConfig(
        name=name,
        model=model,
        solvers=(SolverChoice("unipc_bh1", 3), SolverChoice("ipndm", 4)),
        nfes=(4, 6, 8, 10),
        teacher=TeacherConfig(solver="unipc_bh1", order=3, nfe=20, discretization="edm_rho", num_samples=100,
                              batch_size=50, num_gpus_per_actor=0.5),
        num_train=50,
        num_validation=50,
        trainer=LD3Config(loss="lpips"),  # rounds 2 + 5, train batch 2, lr2 = 0.1 / N
        search=SearchSpace(),  # lr2 coefficient searched in [0.01, 1] around the recipe's 0.1
        num_trials=16,
        max_concurrent=4,
        gpus_per_trial=0.25,  # four small-network trials share a GPU
        asha_grace_epochs=2.0,  # phase 1 (two rounds)
    )


def latent_study(name: str, model: ModelSpec) -> StudyConfig:
    """The paper's recipe for latent and text-to-image models (decoded images in the loss).

    The teacher is UniPC bh2-3 with NFE 20 on a time-uniform grid (the latent models' usual spacing).
    lr2 is 0.001 / N in the paper (the first trial's value); the search covers [1e-4, 1e-2] / N.
    """
    return StudyConfig(
        name=name,
        model=model,
        solvers=(SolverChoice("unipc_bh2", 3), SolverChoice("ipndm", 4)),
        nfes=(4, 5, 6, 7),
        teacher=TeacherConfig(solver="unipc_bh2", order=3, nfe=20, discretization="time_uniform", num_samples=100,
                              batch_size=10, num_gpus_per_actor=1.0),
        num_train=50,
        num_validation=50,
        trainer=LD3Config.for_latent_model(loss="lpips", val_batch_size=10),
        search=SearchSpace(lr2_coef=(1e-4, 1e-2), rounds_v2=(1, 5), train_batch_sizes=(1, 2)),
        num_trials=12,
        max_concurrent=2,
        gpus_per_trial=0.5,
        asha_grace_epochs=2.0,  # phase 1 (two rounds)
        eval_batch_size=10,
    )


def bundled_study(study: StudyConfig, k: int) -> StudyConfig:
    """``study`` with its trials trained ``k`` at a time in one batched solve (docs/design.md#batched-trials):
    the search keeps the trainer's rounds and train batch size (a bundle's trials share them), ``k`` trials
    run at once, and each bundle takes one GPU when the study uses GPUs."""
    return replace(study, trials_per_bundle=k, max_concurrent=k, search=bundle_search(study.search, study.trainer),
                   gpus_per_trial=1.0 if study.gpus_per_trial > 0 else 0.0)


def smoke_variant(study: StudyConfig) -> StudyConfig:
    """A tiny version of ``study`` for CI: 1 solver, 1 NFE, 2 trials, 4 + 4 samples, 1 + 1 rounds, L2, CPU."""
    return replace(
        study,
        name=f"{study.name}-smoke",
        teacher=replace(study.teacher, num_samples=8, batch_size=4, concurrency=1, num_gpus_per_actor=0.0, conditions=None),
        solvers=study.solvers[:1],
        nfes=study.nfes[:1],
        num_train=4,
        num_validation=4,
        trainer=replace(study.trainer, loss="l2", rounds_v1=1, rounds_v2=1, val_batch_size=4),
        search=replace(study.search, rounds_v1=(1, 1), rounds_v2=(1, 1), train_batch_sizes=(2,)),
        num_trials=2,
        max_concurrent=2,
        gpus_per_trial=0.0,
        asha_grace_epochs=1.0,
        eval_batch_size=8,
    )


# ---------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------
def balanced_class_ids(num_samples: int, n_classes: int, seed: int) -> tuple[int, ...]:
    """Class ids for ``num_samples`` samples: every class equally often (up to one), in a seeded random order."""
    import torch  # torch's generator fixes the order (and with it the teacher cache key)

    generator = torch.Generator().manual_seed(seed)
    rounds = math.ceil(num_samples / n_classes)
    ids = torch.cat([torch.randperm(n_classes, generator=generator) for _ in range(rounds)])
    return tuple(int(i) for i in ids[:num_samples])


def parse_class_labels(text: str, num_samples: int, n_classes: int) -> tuple[int, ...]:
    """``--class-labels "3"`` or ``"1,5,7"``: the ids cycled over the samples."""
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        labels = []
    if not labels or any(not 0 <= label < n_classes for label in labels):
        raise ValueError(f"--class-labels must be comma-separated class ids in [0, {n_classes}), got {text!r}")
    return tuple(labels[i % len(labels)] for i in range(num_samples))


# ---------------------------------------------------------------------------------------------
# A study script
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmokeCheckpoint:
    """The tiny random checkpoint of ``--smoke-test``: function ``maker`` of ``pipeline.models.smoke`` called with
    ``kwargs`` on first use (that module builds torch networks, so a study script names it without importing it)."""

    maker: str  # e.g. "tiny_edm_pickle"
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self) -> Path:
        from pipeline.models import smoke

        return getattr(smoke, self.maker)(**self.kwargs)


@dataclass(frozen=True)
class ModelStudy:
    """A per-model study script: its frozen study and where and how it finds the checkpoint.

    ``study.model`` is a template: its family, model id and builder options (e.g. ``guidance_scale``);
    :meth:`make_config` fills in the checkpoint path and its digest.
    """

    study: StudyConfig
    description: str
    env_var: str  # environment fallback of --checkpoint, e.g. LD3_CIFAR10_CHECKPOINT
    default_checkpoint: str  # looked for when neither --checkpoint nor the variable is set
    how_to_get: str  # one sentence: where the checkpoint comes from
    image_shape: tuple[int, int, int]  # (C, H, W) of the images the checkpoint must make (decoded if latent)
    smoke_checkpoint: Callable[[], Path]  # a tiny random checkpoint of the same family (pipeline.models.smoke)
    prompts_env_var: str | None = None  # text models: environment fallback of --prompts
    default_prompts: str | None = None  # text models: looked for when neither --prompts nor the variable is set

    def __post_init__(self) -> None:
        if (self.study.model.family == "stable_diffusion") != (self.prompts_env_var is not None):
            raise ValueError("ModelStudy.prompts_env_var is required for the stable_diffusion family and only there")

    @property
    def model_options(self) -> tuple[str, ...]:
        """Builder options this family takes from the command line."""
        family = self.study.model.family
        options = ["gradient_checkpointing", "autocast_bf16"]
        options += ["weights_dtype"] if family in DIFFUSERS_FAMILIES else []
        options += ["guidance_scale", "null_class"] if family in ("diffusers_pixel", "diffusers_latent") else []
        options += ["guidance_scale", "single_file_config"] if family == "stable_diffusion" else []
        return tuple(options)

    # ---- command line ----------------------------------------------------------------------------
    def parser(self) -> argparse.ArgumentParser:
        """The common study flags plus this model's."""
        p = build_parser(self.description, self.study)
        family, kwargs = self.study.model.family, self.study.model.kwargs
        p.add_argument("--checkpoint", default=None,
                       help=f"the model ({family}); default: ${self.env_var}, else {self.default_checkpoint}")
        p.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each network call in the backward pass (memory of one call)")
        p.add_argument("--bf16", dest="autocast_bf16", action="store_true", help="run the network under bf16 autocast")
        p.add_argument("--cuda-graphs", action="store_true",
                       help="replay the trainer's solves from CUDA graphs and solve each validation check in one batch "
                            "(GPU trials; bench/RESULTS.md: reference recipe 229 s -> 39 s on an H200; kernels may differ "
                            "in rounding from the eager ones); on GPUs it also trains the trials "
                            f"{GPU_TRIALS_PER_BUNDLE} per bundle unless --trials-per-bundle says otherwise")
        if "weights_dtype" in self.model_options:
            p.add_argument("--weights-dtype", choices=sorted(WEIGHTS_DTYPE_NAMES), default=None,
                           help="load the network weights in this dtype (default: float32)")
        if "guidance_scale" in self.model_options:
            p.add_argument("--guidance-scale", type=float, default=None,
                           help=f"classifier-free guidance scale (default: {kwargs.get('guidance_scale', 1.0)})")
        if "null_class" in self.model_options:
            p.add_argument("--null-class", type=int, default=None,
                           help="label id of the unconditional branch of a guided class-conditional UNet")
        if "single_file_config" in self.model_options:
            p.add_argument("--single-file-config", default=None,
                           help="with a single .safetensors checkpoint: an SD v1.x pipeline folder giving the component "
                                f"configs (default: {SD_EXAMPLE_REPO} from the Hugging Face cache)")
        if family == "edm":
            p.add_argument(TRUST_FLAG, action="store_true",
                           help=f"let the checkpoint run the Python source it embeds (EDM release pickles do; same as "
                                f"{TRUST_ENV_VAR}=1); only for files you trust")
        if family in CLASS_FAMILIES:
            p.add_argument("--class-labels", default=None,
                           help="class-conditional models: comma-separated class ids cycled over the samples "
                                "(default: every class equally often, seeded random order)")
        if self.prompts_env_var is not None:
            p.add_argument("--prompts", default=None,
                           help=f"MS-COCO captions JSON or text file (one prompt per line); default: "
                                f"${self.prompts_env_var}, else {self.default_prompts}")
        return p

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Run the script: parse, check, study, report (exit code 2 and one line on bad input)."""
        return cli_main(self.make_config, self.description, argv, parser=self.parser())

    # ---- the study -------------------------------------------------------------------------------
    def make_config(self, args: argparse.Namespace) -> StudyConfig:
        """The study for these flags, with every model input checked (module docstring). Writes only into
        ``$XDG_CACHE_HOME/ld3`` (checkpoint digests; the tiny checkpoint of ``--smoke-test``)."""
        from ld3.losses import get_loss  # the model's libraries: imported once a study is built
        from pipeline.models.checkpoints import record_checkpoint_digest

        study = smoke_variant(self.study) if args.smoke_test else self.study
        if getattr(args, "trust_checkpoint_code", False):
            os.environ[TRUST_ENV_VAR] = "1"  # read by the loader here and in the Ray workers this process starts
        spec = self._spec(args)
        conditions = self._conditions(spec, args, study)
        record_checkpoint_digest(spec.kwargs["checkpoint"])  # only now: the file loaded
        if study.trainer.loss == "lpips":
            get_loss("lpips")  # MissingWeightsError names the VGG file, where it was looked for and how to get it
        gpus = study.gpus_per_trial if args.gpus_per_trial is None else args.gpus_per_trial
        self._check_gpus(gpus, args)
        teacher = replace(study.teacher, conditions=conditions,
                          num_gpus_per_actor=study.teacher.num_gpus_per_actor if gpus > 0 else 0.0)
        trainer = study.trainer
        if args.cuda_graphs:
            trainer = replace(trainer, cuda_graphs=True, val_solve_batch_size=study.num_validation)
        study = replace(study, model=spec, teacher=teacher, trainer=trainer)
        default_k = GPU_TRIALS_PER_BUNDLE if args.cuda_graphs and gpus > 0 else 1
        k = default_k if args.trials_per_bundle is None else args.trials_per_bundle
        return bundled_study(study, k) if k > 1 else study

    def _check_gpus(self, gpus: float, args: argparse.Namespace) -> None:
        import torch

        if gpus > 0 and args.address is None and not torch.cuda.is_available():
            raise ValueError(
                f"this study runs its trials on GPUs (--gpus-per-trial {gpus:g}), but no CUDA device is visible; "
                "run it on a GPU machine or cluster (--address auto), pass --gpus-per-trial 0 to use CPUs (slow), "
                "or try --smoke-test"
            )

    def _checkpoint(self, args: argparse.Namespace) -> tuple[str, str]:
        """(checkpoint, where it came from)."""
        if args.smoke_test and args.checkpoint is None:
            return str(self.smoke_checkpoint()), "the smoke-test model"
        if args.checkpoint is not None:
            return args.checkpoint, "--checkpoint"
        if os.environ.get(self.env_var):
            return os.environ[self.env_var], f"${self.env_var}"
        return self.default_checkpoint, f"the default location (no --checkpoint, ${self.env_var} unset)"

    def _spec(self, args: argparse.Namespace) -> ModelSpec:
        from pipeline.models.checkpoints import checkpoint_spec

        template = self.study.model
        checkpoint, source = self._checkpoint(args)
        chosen = {name: getattr(args, name) for name in self.model_options if getattr(args, name) not in (None, False)}
        model_id = f"{template.model_id}-smoke" if args.smoke_test else template.model_id
        try:
            return checkpoint_spec(template.family, checkpoint, model_id=model_id, record_digest=False,
                                   **(dict(template.kwargs) | chosen))
        except MissingWeightsError:
            where = Path(checkpoint).expanduser().absolute()
            raise MissingWeightsError(
                f"checkpoint {Path(checkpoint).name!r} not found: looked for {where} (from {source}); "
                f"{self.how_to_get}, then pass --checkpoint PATH or set {self.env_var}"
            ) from None

    def _conditions(self, spec: ModelSpec, args: argparse.Namespace, study: StudyConfig) -> tuple[ConditionValue, ...] | None:
        """Build the model on the CPU once: check its image shape, then the conditions it needs."""
        denoiser = spec.build("cpu").denoiser
        if not args.smoke_test and tuple(denoiser.image_shape) != self.image_shape:
            raise ValueError(
                f"--checkpoint {spec.kwargs['checkpoint']} makes {'×'.join(map(str, denoiser.image_shape))} images, "
                f"but this study expects {'×'.join(map(str, self.image_shape))}; {self.how_to_get}"
            )
        num_samples, kind = study.teacher.num_samples, denoiser.condition_kind
        labels, prompts = getattr(args, "class_labels", None), getattr(args, "prompts", None)
        if kind != "class" and labels is not None:
            raise ValueError(f"--class-labels was given, but {spec.kwargs['checkpoint']} is not class-conditional; drop it")
        if kind == "class":
            n_classes = int(getattr(denoiser, "n_classes", getattr(denoiser, "label_dim", 0)))
            if labels is not None:
                return parse_class_labels(labels, num_samples, n_classes)
            return balanced_class_ids(num_samples, n_classes, study.seed)
        if kind == "text":
            return self._prompts(prompts, num_samples, args.smoke_test)
        return None

    def _prompts(self, path: str | None, num_samples: int, smoke_test: bool) -> tuple[str, ...]:
        """The first ``num_samples`` prompts (train, then validation) of the prompt file."""
        from ld3.models.stable_diffusion import load_prompts
        from pipeline.models.smoke import SMOKE_PROMPTS

        if path is None and smoke_test:
            return tuple(SMOKE_PROMPTS[i % len(SMOKE_PROMPTS)] for i in range(num_samples))
        path = path or os.environ.get(self.prompts_env_var) or self.default_prompts
        try:
            prompts = load_prompts(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}; pass --prompts PATH or set {self.prompts_env_var}") from None
        if len(prompts) < num_samples:
            raise ValueError(f"--prompts {path} holds {len(prompts)} prompts; this study needs {num_samples} "
                             "(training, then validation)")
        return tuple(prompts[:num_samples])
