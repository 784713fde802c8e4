"""LD3 on the project's own trained diffusion model: class-conditional 8×8 digits, end to end on the CPU.

    python studies/digits.py                       # class-conditional (a few minutes on 2 cores)
    python studies/digits.py --unconditional       # the null-label (unconditional) variant
    python studies/digits.py --guidance-scale 2    # classifier-free guidance, w = 2
    python studies/digits.py --smoke-test          # seconds, for CI

The model (ld3.digits: an EDM-preconditioned UNet trained by ``python -m ld3.digits.train``, shipped as
sha256-checked safetensors) is a real trained network, so its teacher is a real ODE solve with a real
network's errors. Beside the validation loss the study reports, for 1,000 fresh samples of every
schedule, the classifier Fréchet distance (``fd_classifier``: an FID analogue in a digit classifier's
feature space, not FID) and the classifier's accuracy on the asked classes (``class_accuracy``); the
evaluation stage then scores every learned schedule, EDM ρ=7 and logSNR-uniform again on 2,000 other samples
and logs a 10×10 sample grid to each MLflow run.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ld3.config import LD3Config
from pipeline.cli import build_parser, main
from pipeline.evaluation.config import EvaluationConfig
from pipeline.model_studies import balanced_class_ids
from pipeline.models.spec import digits_spec
from pipeline.search.space import SearchSpace, SolverChoice
from pipeline.study_config import StudyConfig
from pipeline.teacher.config import TeacherConfig

NUM_SAMPLES, SEED, N_CLASSES = 100, 0, 10  # 50 train + 50 validation teacher samples
# The teacher's class labels (every class equally often, seeded order; drawn with torch) are set by make_config.
STUDY = StudyConfig(
    name="digits",
    model=digits_spec(conditional=True),
    teacher=TeacherConfig(solver="unipc_bh1", order=3, nfe=20, discretization="edm_rho", num_samples=NUM_SAMPLES,
                          batch_size=50, concurrency=2),
    solvers=(SolverChoice("unipc_bh1", 3), SolverChoice("ipndm", 4)),
    nfes=(4,),
    num_train=50,
    num_validation=50,
    # the validation slack pass and the checks' solves in one batch of 50 (the same steps as the reference's
    # per-train-batch pass, docs/method.md): a quarter less CPU per trial
    trainer=LD3Config(loss="l2", val_slack_batch_size=50, val_solve_batch_size=50),
    # the default ranges, with at most 6 rounds and batches of 2 or 4 samples: every trial stays near a minute
    # on one CPU core (the UNet is the cost)
    search=SearchSpace(rounds_v1=(1, 2), rounds_v2=(2, 4), train_batch_sizes=(2, 4)),
    num_trials=6,
    max_concurrent=2,
    asha_grace_epochs=2.0,  # phase 1 (two rounds) before ASHA may stop a trial
    fd_samples=1000,  # per trial and baseline run: classifier FD and accuracy of 1,000 fresh samples
    # last stage: 2,000 more samples per schedule (other seeds), classifier FD and accuracy, a 10×10 sample grid;
    # beside the learned grid the two fixed grids in reach at NFE 4 (time-uniform/-quadratic score FD 60-85);
    # two workers, one per core (the numbers do not depend on the split)
    evaluation=EvaluationConfig(num_samples=2000, baselines=("edm_rho", "logsnr_uniform"), grid_size=10,
                                batch_size=1000, device_batch_size=500, concurrency=2),
    seed=SEED,
)


def make_config(args: argparse.Namespace) -> StudyConfig:
    """The study for the chosen variant (conditional, unconditional or guided), smoke-sized on request."""
    conditional = not args.unconditional
    if args.guidance_scale != 1.0 and not conditional:
        raise ValueError("--guidance-scale needs the class-conditional model; drop --unconditional")
    name = "digits" + ("" if conditional else "-uncond") + ("" if args.guidance_scale == 1.0 else f"-cfg{args.guidance_scale:g}")
    conditions = balanced_class_ids(NUM_SAMPLES, N_CLASSES, SEED) if conditional else None
    study = replace(STUDY, name=name, model=digits_spec(conditional=conditional, guidance_scale=args.guidance_scale),
                    teacher=replace(STUDY.teacher, conditions=conditions))
    if not args.smoke_test:
        return study
    return replace(
        study,
        name=f"{name}-smoke",
        teacher=replace(study.teacher, num_samples=20, batch_size=10,
                        conditions=study.teacher.conditions[:20] if conditional else None),
        solvers=study.solvers[:1],
        num_train=10,
        num_validation=10,
        trainer=replace(study.trainer, rounds_v1=1, rounds_v2=1, val_batch_size=10),
        search=SearchSpace(rounds_v1=(1, 1), rounds_v2=(1, 1)),
        num_trials=2,
        asha_grace_epochs=1.0,
        fd_samples=200,
        evaluation=replace(study.evaluation, num_samples=200, batch_size=100, device_batch_size=100),
    )


def parser() -> argparse.ArgumentParser:
    p = build_parser(__doc__.splitlines()[0], STUDY)
    p.add_argument("--unconditional", action="store_true", help="sample with the null label (no class conditioning)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance scale w (1: none)")
    return p


if __name__ == "__main__":
    sys.exit(main(make_config, __doc__.splitlines()[0], parser=parser()))
