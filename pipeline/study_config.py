"""What a study is (``StudyConfig``: a model, its teacher, the (solver, NFE) cells, the search and evaluation
settings) and where it runs and writes (``StudyOptions``). Plain data, no torch, Ray, MLflow or Optuna: a study
script builds its config at import, so ``--help`` and the input checks stay fast; ``pipeline.driver`` runs it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ld3.catalog import coefficient_shape
from ld3.config import BUNDLE_SHARED_FIELDS, LD3Config
from pipeline.evaluation.config import EvaluationConfig
from pipeline.models.spec import ModelSpec
from pipeline.search.space import MEMBER_CPUS, SearchSpace, SolverChoice
from pipeline.teacher.config import TeacherConfig


@dataclass(frozen=True)
class StudyConfig:
    """One study: a model, its teacher, and the (solver, NFE) cells to search. Frozen; built per script."""

    name: str  # experiment / study name (letters, digits, '.', '_', '-')
    model: ModelSpec
    teacher: TeacherConfig = TeacherConfig()
    solvers: tuple[SolverChoice, ...] = (SolverChoice("unipc_bh1", 3), SolverChoice("ipndm", 4))
    nfes: tuple[int, ...] = (4, 6, 8, 10)
    num_train: int = 50  # teacher samples used for training (sample ids 0..num_train-1)
    num_validation: int = 50  # the next ids, for validation and model selection
    trainer: LD3Config = LD3Config()  # base hyperparameters; the search overrides the searched ones
    search: SearchSpace = SearchSpace()
    num_trials: int = 12  # Optuna trials per cell
    max_concurrent: int = 2  # trials running at once per cell
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractions share a GPU between trials
    asha_grace_epochs: float = 2.0  # passes over the training data every trial makes before ASHA may stop it
    asha_reduction_factor: int = 3
    fd_samples: int = 2000  # samples for the exact data-space Fréchet distance (GMM models only)
    eval_batch_size: int = 256
    seed: int = 0  # seeds Optuna's TPE sampler
    evaluation: EvaluationConfig | None = None  # sample quality (FID / exact FD) after the search; None skips it
    trials_per_bundle: int = 1  # K > 1: K trials train in one batched solve (LD3Bundle) on one bundle worker

    def __post_init__(self) -> None:
        if not self.solvers:
            raise ValueError("StudyConfig.solvers is empty; give at least one SolverChoice")
        if not self.nfes or any(not isinstance(n, int) or n < 1 for n in self.nfes):
            raise ValueError(f"StudyConfig.nfes must be integers >= 1, got {self.nfes}")
        for choice in self.solvers:
            for nfe in self.nfes:
                choice.n_steps(nfe)  # raises when a solver cannot spend that NFE
        if self.num_train < 1 or self.num_validation < 1:
            raise ValueError("StudyConfig.num_train and num_validation must be >= 1")
        if self.num_train + self.num_validation > self.teacher.num_samples:
            raise ValueError(
                f"num_train + num_validation = {self.num_train + self.num_validation} exceeds the teacher's "
                f"num_samples = {self.teacher.num_samples}; raise TeacherConfig.num_samples"
            )
        if self.asha_grace_epochs <= 0 or self.asha_reduction_factor < 2:
            raise ValueError("StudyConfig.asha_grace_epochs must be > 0 and asha_reduction_factor >= 2")
        if self.num_trials < 1 or self.max_concurrent < 1:
            raise ValueError("StudyConfig.num_trials and max_concurrent must be >= 1")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ValueError("StudyConfig.cpus_per_trial must be > 0 and gpus_per_trial >= 0")
        if True in self.search.learn_coefficients:
            self._check_learnable_coefficients()
        self._check_bundles()

    def _check_learnable_coefficients(self) -> None:
        """Every solver of the study has coefficients to learn, and the trainer accepts learning them."""
        for choice in self.solvers:
            try:
                coefficient_shape(choice.name, 1, choice.order)
            except ValueError as err:
                raise ValueError(f"SearchSpace.learn_coefficients includes True, but {err}") from None
        replace(self.trainer, learn_coefficients=True)  # LD3Config refuses e.g. cuda_graphs with it

    def _check_bundles(self) -> None:
        """Batched trials (docs/design.md#batched-trials) need bundles inside one batch of max_concurrent trials
        and trials that agree on ``BUNDLE_SHARED_FIELDS`` and learn no coefficients."""
        k = self.trials_per_bundle
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"StudyConfig.trials_per_bundle must be an integer >= 1, got {k!r}")
        if k == 1:
            return
        if self.cpus_per_trial <= k * MEMBER_CPUS:
            raise ValueError(f"trials_per_bundle {k} needs cpus_per_trial > {k * MEMBER_CPUS:g} (each trial of a bundle "
                             f"takes {MEMBER_CPUS:g} CPU of it), got {self.cpus_per_trial:g}")
        if self.max_concurrent % k:
            raise ValueError(f"trials_per_bundle {k} must divide max_concurrent {self.max_concurrent} (a bundle's trials "
                             f"run together, in one batch of max_concurrent); e.g. --max-concurrent {k}")
        if True in self.search.learn_coefficients or self.trainer.learn_coefficients:
            raise ValueError(f"trials_per_bundle {k} cannot learn solver coefficients (an LD3Bundle of several trials "
                             "takes one set per solve); use --learn-coefficients off or trials_per_bundle 1")
        varied = sorted(self.search.varied_fields() & set(BUNDLE_SHARED_FIELDS))
        if varied:
            raise ValueError(f"trials_per_bundle {k} needs the trials of a bundle to share {', '.join(varied)}, but the "
                             "search space varies them; give them one value each in the SearchSpace (e.g. "
                             "rounds_v1=(2, 2), train_batch_sizes=(2,)) or use trials_per_bundle 1")

    def evaluation_config(self) -> EvaluationConfig | None:
        """The evaluation stage's settings; unconditional settings of a conditional teacher take its conditions."""
        config = self.evaluation
        if config is not None and config.conditions is None and self.teacher.conditions is not None:
            config = replace(config, conditions=tuple(self.teacher.sample_conditions()))
        return config


def bundle_search(search: SearchSpace, trainer: LD3Config) -> SearchSpace:
    """``search`` with the fields the trials of a bundle share (rounds, train batch size) fixed to ``trainer``'s."""
    return replace(search, rounds_v1=(trainer.rounds_v1, trainer.rounds_v1),
                   rounds_v2=(trainer.rounds_v2, trainer.rounds_v2), train_batch_sizes=(trainer.train_batch_size,))


@dataclass(frozen=True)
class StudyOptions:
    """Where a study runs and writes (runtime, not part of the science)."""

    address: str | None = None  # Ray address; None starts Ray in-process, "auto" joins a cluster
    num_cpus: int | None = None  # for an in-process Ray only
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<work_dir>/mlflow.db
    cache_dir: str = "ld3_cache"  # teacher cache: local folder or pyarrow filesystem URI
    exports_dir: str = "exports"
    storage_dir: str = "ray_results"  # Tune experiment state (local folder or URI, shared on a cluster)
    work_dir: str = "."  # default home of the MLflow database
    resume: bool = True
    verbose: int = 0  # 0: the progress line only; 1, 2: Tune's own console output too (its verbose levels)
    progress: bool = True  # print the live progress line (pipeline.progress)
