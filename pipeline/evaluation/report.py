"""Recording and reporting of an evaluation: each schedule's metrics, placement tags and sample grid on its
MLflow run, the metrics added to the exported JSON files, the table and per-cell metrics on the study run,
``format_evaluation_table`` (learned vs baselines, like the paper's tables), and ``evaluate_exports`` (an
exports folder, after the fact)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ld3.baselines import AYS_MODEL_OF_FAMILY
from pipeline.evaluation.config import EvaluationConfig
from pipeline.evaluation.sampling import evaluate_schedules
from pipeline.evaluation.targets import (
    CLASS_ACCURACY,
    FD_CLASSIFIER,
    FD_EXACT,
    FID,
    GRID_ARTIFACT,
    LEARNED,
    NUM_SAMPLES,
    EvaluationResult,
    ScheduleEvaluation,
    targets_from_exports,
)
from pipeline.models.spec import ModelSpec
from pipeline.recording.exports import load_schedule, save_export
from pipeline.recording.plots import grid_image
from pipeline.recording.runs import Client, StudyTracker, log_to_run
from pipeline.recording.tracking import connect


def _run_tags(config: EvaluationConfig, nodes: Sequence[str]) -> dict[str, str]:
    tags = {"eval_seed_offset": str(config.seed_offset), "eval_ray_nodes": ",".join(nodes)}
    if config.fid_reference is not None:
        tags["eval_fid_reference"] = str(config.fid_reference)
    return tags


def _log_to_run(client: Client, evaluation: ScheduleEvaluation, config: EvaluationConfig) -> None:
    grid = None if evaluation.grid is None else grid_image(evaluation.grid, max(1, config.grid_size))
    log_to_run(client, evaluation.target.mlflow_run_id, evaluation.metrics, _run_tags(config, evaluation.nodes),
               grid, GRID_ARTIFACT)


def _export_metrics(result: EvaluationResult) -> dict[str, dict[str, float]]:
    """Export path -> the metrics to add: its own, and each baseline's of the same cell as ``baseline_<name>_<metric>``."""
    by_cell: dict[tuple, list[ScheduleEvaluation]] = defaultdict(list)
    for evaluation in result.schedules:
        by_cell[evaluation.target.cell].append(evaluation)
    updates = {}
    for evaluations in by_cell.values():
        for learned in (e for e in evaluations if e.target.export_path is not None):
            metrics = dict(learned.metrics)
            for other in evaluations:
                if other.target.name != LEARNED:
                    metrics |= {f"baseline_{other.target.name}_{k}": v for k, v in other.metrics.items() if k != NUM_SAMPLES}
            updates[learned.target.export_path] = metrics
    return updates


def _update_export(path: str, metrics: Mapping[str, float], tracker: StudyTracker | None) -> Path:
    """Add ``metrics`` to an exported schedule (atomic rewrite; logged again to the study run if given)."""
    exported = load_schedule(path)
    updated = replace(exported, metrics={**exported.metrics, **metrics})
    return save_export(updated, Path(path).parent, tracker=tracker)


def record_evaluation(result: EvaluationResult, client: Client | None = None, *,
                      tracker: StudyTracker | None = None) -> None:
    """Log each schedule's metrics, placement tags and sample grid to its MLflow run (with ``client``), add the
    metrics to the exported JSON files, and log the table and per-cell metrics to the study run (``tracker``)."""
    client = client or (tracker.client if tracker is not None else None)
    if client is not None:
        for evaluation in result.schedules:
            if evaluation.target.mlflow_run_id is not None:
                _log_to_run(client, evaluation, result.config)
    for path, metrics in _export_metrics(result).items():
        _update_export(path, metrics, tracker)
    if tracker is not None:
        summary = {f"{e.target.solver}-o{e.target.order}_nfe{e.target.nfe}_{e.target.name}_{k}": v
                   for e in result.schedules for k, v in e.metrics.items() if k != NUM_SAMPLES}
        tracker.log_metrics(summary)
        tracker.flush()
        tracker.log_dict({"config": result.config, "schedules": [_summary_row(e) for e in result.schedules]},
                         "evaluation.json")
        tracker.log_text(format_evaluation_table(result), "evaluation.txt")


def _summary_row(evaluation: ScheduleEvaluation) -> dict[str, Any]:
    target = evaluation.target
    return {"solver": target.solver, "order": target.order, "nfe": target.nfe, "schedule": target.name,
            "metrics": evaluation.metrics, "mlflow_run_id": target.mlflow_run_id, "export": target.export_path,
            "ray_nodes": list(evaluation.nodes)}


_METRIC_TITLES = {FID: "FID (lower is better)", FD_EXACT: "exact data-space Fréchet distance (lower is better)",
                  FD_CLASSIFIER: "classifier Fréchet distance, an FID analogue (lower is better)",
                  CLASS_ACCURACY: "classifier accuracy on the asked class (higher is better)"}


def format_evaluation_table(result: EvaluationResult) -> str:
    """One table per metric: rows (solver, NFE), columns the baselines and the learned schedule (lower is better)."""
    names = sorted({e.target.name for e in result.schedules} - {LEARNED}) + [LEARNED]
    cells = sorted({e.target.cell for e in result.schedules})
    value = {(e.target.cell, e.target.name): e.metrics for e in result.schedules}
    width = max(12, *(len(n) + 2 for n in names))
    blocks = []
    for metric, title in _METRIC_TITLES.items():
        if not any(metric in e.metrics for e in result.schedules):
            continue
        header = f"{'solver':<16}{'NFE':>4}" + "".join(f"{n:>{width}}" for n in names)
        lines = [f"{title}, {result.config.num_samples} samples per schedule", header, "-" * len(header)]
        for solver, order, nfe in cells:
            entries = [value.get(((solver, order, nfe), n), {}).get(metric) for n in names]
            lines.append(f"{f'{solver}-o{order}':<16}{nfe:>4}"
                         + "".join(f"{'—' if v is None else f'{v:.4g}':>{width}}" for v in entries))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------


def evaluate_exports(spec: ModelSpec, exports_dir: str | Path, config: EvaluationConfig = EvaluationConfig(), *,
                     tracking_uri: str | None = None, dtype: torch.dtype = torch.float32,
                     reserved_seeds: Iterable[int] = (), show_progress: bool = True) -> EvaluationResult:
    """Evaluate the schedules exported for ``spec`` in ``exports_dir`` and the baselines of their cells; with
    ``tracking_uri`` (the study's), log to the trial and baseline runs. Metrics go into the JSON files."""
    client = connect(tracking_uri) if tracking_uri is not None else None
    targets = targets_from_exports(exports_dir, model=spec.model_id, client=client, baselines=config.baselines,
                                   ays_model=AYS_MODEL_OF_FAMILY.get(spec.family))
    result = evaluate_schedules(spec, targets, config, dtype=dtype, reserved_seeds=reserved_seeds,
                                show_progress=show_progress)
    record_evaluation(result, client)
    return result
