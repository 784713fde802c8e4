"""The one pattern both the teacher and the evaluation use to spread seeded work over Ray: per-sample requests
(an id, the sample's seed, its condition) in Arrow blocks of one batch each, mapped by a pool of Ray Data
actors that each build the model once. Results never depend on the split: a sample's latent comes from its
own seed (docs/design.md#randomness-per-sample)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import ray

from pipeline.models.registry import ConditionValue


def condition_array(conditions: Sequence[ConditionValue]) -> pa.Array:
    """Class ids as int64, prompts as strings."""
    return pa.array(conditions, type=pa.string() if isinstance(conditions[0], str) else pa.int64())


def sample_columns(ids: Sequence[int], seeds: Sequence[int], conditions: Sequence[ConditionValue] | None,
                   id_column: str = "sample_id") -> dict[str, pa.Array]:
    """The per-sample identity columns: ``id_column``, seed and, when conditional, condition."""
    columns = {id_column: pa.array(ids, type=pa.int64()), "seed": pa.array(seeds, type=pa.int64())}
    if conditions is not None:
        columns["condition"] = condition_array(conditions)
    return columns


def request_blocks(seeds: Sequence[int], conditions: Sequence[ConditionValue] | None, batch_size: int, *,
                   id_column: str = "sample_id", constants: Mapping[str, int] | None = None) -> list[pa.Table]:
    """Requests for samples 0..len(seeds)-1, one Arrow block per ``batch_size`` of them; ``constants`` become
    int64 columns of equal values (e.g. which schedule the samples are for)."""
    blocks = []
    for start in range(0, len(seeds), batch_size):
        stop = min(start + batch_size, len(seeds))
        columns = {name: pa.array([value] * (stop - start), pa.int64()) for name, value in (constants or {}).items()}
        columns |= sample_columns(range(start, stop), seeds[start:stop],
                                  None if conditions is None else conditions[start:stop], id_column)
        blocks.append(pa.table(columns))
    return blocks


def map_on_actor_pool(blocks: list[pa.Table], worker: type, worker_kwargs: Mapping[str, Any], *, batch_size: int,
                      concurrency: int, num_cpus: float, num_gpus: float, start_all_actors_s: int | None = None,
                      raise_original: bool = False) -> ray.data.Dataset:
    """``worker(**worker_kwargs)(batch)`` over the request ``blocks`` on ``concurrency`` actors. ``from_blocks`` keeps one block per batch (each actor call
    gets one) and, unlike ``from_arrow``, needs no Ray task per block to read its metadata.

    ``start_all_actors_s``: start every actor before the first batch (so the work spreads over all of them and
    their nodes however small it is), an error after this long. ``raise_original``: an exception raised by the
    worker's code reaches the caller as itself, not wrapped by Ray Data."""
    dataset = ray.data.from_blocks(blocks).map_batches(
        worker,
        fn_constructor_kwargs=dict(worker_kwargs),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    if start_all_actors_s is not None:
        dataset.context.wait_for_min_actors_s = start_all_actors_s
    if raise_original:
        dataset.context.raise_original_map_exception = True
    return dataset
