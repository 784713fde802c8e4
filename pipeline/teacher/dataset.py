"""Teacher data in memory and in Arrow: ``TeacherDataset`` (torch tensors ordered by sample id, the trainer's
input) and the conversions between its rows and the Parquet parts of the cache (fixed-shape tensor columns,
bit-exact), with the layout checks that make a damaged dataset fail loudly (``CacheCorruptError``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from pipeline.actor_pool import sample_columns
from pipeline.errors import CacheCorruptError
from pipeline.models.registry import ConditionValue
from pipeline.teacher.solve import TeacherBatch

TENSOR_COLUMNS = ("z", "y", "trajectory")


def tensor_array(values: Tensor) -> pa.FixedShapeTensorArray:
    """[B, *shape] tensor -> Arrow fixed-shape tensor column (bit-exact)."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values.detach().cpu().numpy()))


def teacher_table(
    sample_ids: Sequence[int], seeds: Sequence[int], conditions: Sequence[ConditionValue] | None, batch: TeacherBatch
) -> pa.Table:
    """One Parquet part: sample_id, seed, [condition], z, y, [trajectory]."""
    columns = sample_columns(sample_ids, seeds, conditions)
    columns |= {"z": tensor_array(batch.z), "y": tensor_array(batch.y)}
    if batch.trajectory is not None:
        columns["trajectory"] = tensor_array(batch.trajectory)
    return pa.table(columns)


def column_layout(batch: TeacherBatch) -> dict[str, dict[str, Any]]:
    tensors = {"z": batch.z, "y": batch.y, "trajectory": batch.trajectory}
    return {
        name: {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}
        for name, t in tensors.items()
        if t is not None
    }


@dataclass(frozen=True)
class TeacherDataset:
    """Teacher data as torch tensors, rows ordered by sample id (the trainer's input)."""

    sample_id: Tensor  # [n] int64
    seed: Tensor  # [n] int64
    z: Tensor  # [n, *latent_shape] latents, x_T = sigma_max z
    y: Tensor  # [n, *output_shape] teacher outputs (decoded for latent models)
    trajectory: Tensor | None  # [n, NFE, *latent_shape] states at the teacher's denoiser calls, if kept
    trajectory_sigmas: Tensor | None  # [NFE] float64 sigma of each of those calls
    condition: Tensor | tuple[str, ...] | None  # [n] int64 class ids, or prompts, or None
    metadata: dict[str, Any]  # the dataset's manifest

    def __len__(self) -> int:
        return int(self.sample_id.numel())

    def subset(self, index: Tensor) -> TeacherDataset:
        """Rows at positions ``index`` (a LongTensor)."""
        index = index.to(self.sample_id.device)
        condition = self.condition
        if isinstance(condition, tuple):
            condition = tuple(condition[i] for i in index.tolist())
        elif condition is not None:
            condition = condition[index]
        return replace(
            self,
            sample_id=self.sample_id[index],
            seed=self.seed[index],
            z=self.z[index],
            y=self.y[index],
            trajectory=None if self.trajectory is None else self.trajectory[index],
            condition=condition,
        )

    def split(self, num_train: int, num_validation: int | None = None) -> tuple[TeacherDataset, TeacherDataset]:
        """Deterministic train/validation split by sample id: ids [0, num_train) and the next ``num_validation``."""
        n = len(self)
        if num_validation is None:
            num_validation = n - num_train
        if not (1 <= num_train and 1 <= num_validation and num_train + num_validation <= n):
            raise ValueError(
                f"need num_train >= 1, num_validation >= 1 and num_train + num_validation <= {n} samples, "
                f"got num_train={num_train}, num_validation={num_validation}; generate more samples or split smaller"
            )
        positions = torch.arange(n, device=self.sample_id.device)
        return self.subset(positions[:num_train]), self.subset(positions[num_train : num_train + num_validation])

    def to(self, device: torch.device | str) -> TeacherDataset:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        condition = self.condition if isinstance(self.condition, tuple) else move(self.condition)
        return replace(
            self,
            sample_id=move(self.sample_id),
            seed=move(self.seed),
            z=move(self.z),
            y=move(self.y),
            trajectory=move(self.trajectory),
            condition=condition,
        )


def _tensor_column(table: pa.Table, name: str, layout: dict[str, Any], source: str) -> Tensor:
    column = table.column(name).combine_chunks()
    if not isinstance(column, pa.FixedShapeTensorArray):
        raise CacheCorruptError(f"column {name!r} of {source} is {column.type}, not a fixed-shape tensor")
    values = column.to_numpy_ndarray()
    if list(values.shape[1:]) != layout["shape"] or str(values.dtype) != layout["dtype"]:
        raise CacheCorruptError(
            f"column {name!r} of {source} holds {values.dtype}{list(values.shape[1:])}, "
            f"the manifest says {layout['dtype']}{layout['shape']}"
        )
    return torch.from_numpy(values.copy())


def dataset_from_table(table: pa.Table, manifest: dict[str, Any], source: str) -> TeacherDataset:
    table = table.sort_by("sample_id")
    sample_id = torch.from_numpy(table.column("sample_id").to_numpy().copy())
    if not torch.equal(sample_id, torch.arange(manifest["num_rows"])):
        raise CacheCorruptError(f"{source} does not hold each sample id 0..{manifest['num_rows'] - 1} exactly once")
    layouts = manifest["columns"]
    tensors = {name: _tensor_column(table, name, layouts[name], source) if name in layouts else None for name in TENSOR_COLUMNS}
    for name, tensor in tensors.items():
        if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CacheCorruptError(f"column {name!r} of {source} holds NaN/Inf values; teacher data must be finite, "
                                    "delete the dataset folder (TeacherCache.delete(key)) to regenerate it")
    condition: Tensor | tuple[str, ...] | None = None
    if manifest["condition"] == "prompt":
        condition = tuple(table.column("condition").to_pylist())
    elif manifest["condition"] == "class_id":
        condition = torch.from_numpy(table.column("condition").to_numpy().copy())
    sigmas = manifest["trajectory_sigmas"]
    return TeacherDataset(
        sample_id=sample_id,
        seed=torch.from_numpy(table.column("seed").to_numpy().copy()),
        z=tensors["z"],
        y=tensors["y"],
        trajectory=tensors["trajectory"],
        trajectory_sigmas=None if sigmas is None else torch.tensor(sigmas, dtype=torch.float64),
        condition=condition,
        metadata=manifest,
    )
