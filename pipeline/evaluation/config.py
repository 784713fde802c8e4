"""The evaluation stage's settings (``EvaluationConfig``): plain data checked against ``ld3.catalog``'s baseline
names, no torch, so a study's config is built and checked without loading the evaluation's workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ld3.catalog import check_baseline_name
from pipeline.errors import check_int

if TYPE_CHECKING:
    from pipeline.models.registry import ConditionValue

DEFAULT_SEED_OFFSET = 2_000_000  # above the teacher's seeds (0..) and the study's FD seeds (1,000,000..)


@dataclass(frozen=True)
class EvaluationConfig:
    """Sample-quality evaluation settings. The first block decides the numbers; the second only where they run."""

    num_samples: int = 50_000  # samples per schedule; published FIDs use 50,000
    seed_offset: int = DEFAULT_SEED_OFFSET  # sample i has seed seed_offset + i; must miss the teacher's seeds
    fid_reference: str | None = None  # .npz with mu/sigma, or a folder/.zip of real images (stats cached); None: no FID
    inception_weights: str | None = None  # FID network file; None: the torch hub cache (ld3.fid.inception_weights_path)
    # Baselines evaluated beside the learned schedule (names of ld3.catalog.BASELINE_NAMES); None: every one the
    # study computed for the cell (ld3.baselines.cell_baselines: the fixed grids, GITS, DMN, AYS where published).
    baselines: tuple[str, ...] | None = None
    conditions: tuple[ConditionValue, ...] | None = None  # class ids or prompts, cycled over the samples; None: unconditional
    grid_size: int = 8  # the sample grid artifact shows grid_size x grid_size samples (0: no grid)

    batch_size: int = 1000  # samples per actor call; each call sends back one partial statistic per schedule (32 MB for FID)
    device_batch_size: int = 100  # samples per solve / Inception pass on the device (bounds GPU memory)
    concurrency: int = 1  # Ray actors, each holding the model and the Inception network once
    num_gpus_per_actor: float = 0.0  # > 0 runs the actors on CUDA (fractions share a GPU)
    num_cpus_per_actor: float = 1.0
    actor_start_timeout_s: int = 1800  # sampling starts once every actor is up (an error after this long, not a hang)

    def __post_init__(self) -> None:
        check_int("EvaluationConfig", "num_samples", self.num_samples, 2)
        check_int("EvaluationConfig", "seed_offset", self.seed_offset, 0)
        check_int("EvaluationConfig", "grid_size", self.grid_size, 0)
        check_int("EvaluationConfig", "batch_size", self.batch_size, 1)
        check_int("EvaluationConfig", "device_batch_size", self.device_batch_size, 1)
        check_int("EvaluationConfig", "concurrency", self.concurrency, 1)
        check_int("EvaluationConfig", "actor_start_timeout_s", self.actor_start_timeout_s, 1)
        for name in self.baselines or ():
            check_baseline_name(name)  # ValueError listing the valid names
        if self.conditions is not None:
            kinds = {isinstance(c, str) for c in self.conditions}
            if not self.conditions or len(kinds) > 1 or any(isinstance(c, bool) for c in self.conditions):
                raise ValueError("EvaluationConfig.conditions must be a non-empty tuple of only class ids or only prompts")
        if self.num_gpus_per_actor < 0 or self.num_cpus_per_actor <= 0:
            raise ValueError("EvaluationConfig.num_gpus_per_actor must be >= 0 and num_cpus_per_actor > 0, got "
                             f"{self.num_gpus_per_actor} and {self.num_cpus_per_actor}")

    def sample_seeds(self) -> range:
        return range(self.seed_offset, self.seed_offset + self.num_samples)

    def sample_condition(self, index: int) -> ConditionValue | None:
        return None if self.conditions is None else self.conditions[index % len(self.conditions)]
