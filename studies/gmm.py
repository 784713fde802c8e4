"""The embedded default study: LD3 on an exact Gaussian-mixture model, end to end on the CPU.

    python studies/gmm.py                 # a real study, a few minutes on 2 cores
    python studies/gmm.py --smoke-test    # seconds, for CI

The GMM (ld3.models.gmm.default_gmm, 3×8×8 "images", 8 components) has an exact denoiser, so the
teacher is a true ODE solution up to the teacher solver's error, and the exact data-space Fréchet
distance of the samples is reported beside the validation loss.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ld3.config import LD3Config
from pipeline.cli import main
from pipeline.models.spec import gmm_spec
from pipeline.search.space import SearchSpace, SolverChoice
from pipeline.study_config import StudyConfig
from pipeline.teacher.config import TeacherConfig

STUDY = StudyConfig(
    name="gmm",
    model=gmm_spec(seed=0),
    teacher=TeacherConfig(solver="unipc_bh1", order=3, nfe=20, discretization="edm_rho", num_samples=100,
                          batch_size=50, concurrency=2),
    solvers=(SolverChoice("unipc_bh1", 3), SolverChoice("ipndm", 4), SolverChoice("dpmpp", 2)),
    nfes=(4, 6, 8),
    num_train=50,
    num_validation=50,
    trainer=LD3Config(loss="l2"),
    num_trials=8,
    max_concurrent=2,
    asha_grace_epochs=2.0,  # phase 1 (two rounds) before ASHA may stop a trial
    fd_samples=2000,
)


def make_config(args: argparse.Namespace) -> StudyConfig:
    if not args.smoke_test:
        return STUDY
    return replace(
        STUDY,
        name="gmm-smoke",
        teacher=replace(STUDY.teacher, num_samples=20, batch_size=10),
        solvers=(SolverChoice("unipc_bh1", 3),),
        nfes=(4,),
        num_train=10,
        num_validation=10,
        trainer=replace(STUDY.trainer, rounds_v1=1, rounds_v2=1),
        search=SearchSpace(rounds_v1=(1, 1), rounds_v2=(1, 1)),
        num_trials=2,
        asha_grace_epochs=1.0,
        fd_samples=400,
    )


if __name__ == "__main__":
    sys.exit(main(make_config, __doc__.splitlines()[0], defaults=STUDY))
