"""A study's result in words: the table of learned vs best baseline per cell (console and summary.md), the
per-cell metrics, summary.json and summary.png on the study's parent run, and the cells without an export."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.recording.plots import plot_learned_vs_baseline
from pipeline.recording.runs import StudyTracker
from pipeline.search.cell import CellResult


def log_summary(tracker: StudyTracker, cells: Sequence[CellResult]) -> None:
    """Per-cell metrics and tags, summary.json, the table as summary.md and summary.png (learned vs best
    baseline validation loss per NFE, one panel per solver) on the study's parent run."""
    for cell in cells:
        prefix = f"{cell.solver.label}_nfe{cell.nfe}"
        metrics = {f"{prefix}_best_baseline_val_loss": cell.best_baseline[1]["final_val_loss"]}
        if cell.best is not None:
            metrics[f"{prefix}_learned_val_loss"] = cell.best["final_val_loss"]
        tracker.log_metrics(metrics)
        tracker.set_tags({f"{prefix}_exported": cell.winner})
    tracker.flush()
    tracker.log_dict({"cells": [_cell_row(c) for c in cells]}, "summary.json")
    tracker.log_text(format_table(cells, markdown=True) + "\n", "summary.md")
    losses = {cell.solver.label: {} for cell in cells}
    for cell in cells:
        losses[cell.solver.label][cell.nfe] = (cell.best_baseline[1]["final_val_loss"],
                                               None if cell.best is None else cell.best["final_val_loss"])
    tracker.log_figure(plot_learned_vs_baseline(losses), "summary.png")


def incomplete_cells(cells: Sequence[CellResult]) -> str:
    """The cells without a finished trial (their export is a baseline grid), e.g. ``"ipndm-o4 NFE 4 (0/1/1)"``; '' if none."""
    return ", ".join(f"{c.solver.label} NFE {c.nfe} ({c.trials['finished']}/{c.trials['stopped']}/{c.trials['failed']})"
                     for c in cells if c.best is None)


def _cell_row(cell: CellResult) -> dict[str, Any]:
    name, base = cell.best_baseline
    row = {"solver": cell.solver.name, "order": cell.solver.order, "nfe": cell.nfe, "best_baseline": name,
           "baseline_cost_s": base.get("schedule_cost_s"), "baseline_val_loss": base["final_val_loss"],
           "fd_metric": cell.fd_key, "best_fd_baseline": cell.best_fd_baseline,
           "learned_val_loss": None if cell.best is None else cell.best["final_val_loss"],
           "learned_fd": None if cell.best is None or cell.fd_key is None else cell.best.get(cell.fd_key),
           "learned_class_accuracy": None if cell.best is None else cell.best.get("class_accuracy"), **cell.trials,
           "exported": cell.winner, "export": cell.export_path}
    return row


def _table_rows(cells: Sequence[CellResult]) -> tuple[list[str], list[list[str]]]:
    has_fd = any(c.best_fd_baseline is not None for c in cells)
    header = ["solver", "NFE", "best baseline", "cost s", "val loss", "learned", "ratio"]
    header += ["FD best baseline", "FD learned"] if has_fd else []
    header += ["trials (ok/stopped/failed)", "exported"]
    rows = []
    for cell in cells:
        name, base = cell.best_baseline
        learned = None if cell.best is None else cell.best["final_val_loss"]
        row = [cell.solver.label, str(cell.nfe), name, f"{base.get('schedule_cost_s', float('nan')):.2g}",
               f"{base['final_val_loss']:.3e}",
               "failed" if learned is None else f"{learned:.3e}",
               "" if learned is None else f"{learned / base['final_val_loss']:.3f}"]
        if has_fd:
            fd_name, fd_base = cell.best_fd_baseline or ("-", float("nan"))
            row += [f"{fd_name} {fd_base:.4f}",
                    "" if cell.best is None else f"{cell.best.get(cell.fd_key, float('nan')):.4f}"]
        t = cell.trials
        row += [f"{t['finished']}/{t['stopped']}/{t['failed']}", "learned" if cell.learned_wins else "baseline"]
        rows.append(row)
    return header, rows


def format_table(cells: Sequence[CellResult], markdown: bool = False) -> str:
    """Learned vs best baseline per (solver, NFE) as fixed-width text (or a Markdown table); the last column
    says which schedule was exported (the better of the two)."""
    header, rows = _table_rows(cells)
    if markdown:
        lines = [header, ["---"] * len(header), *rows]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(line[i]) for line in (header, *rows)) for i in range(len(header))]
    left = {0, 2}  # text columns; numbers align right
    fmt = lambda line: "  ".join(v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))  # noqa: E731
    return "\n".join([fmt(header), "-" * len(fmt(header)), *(fmt(row) for row in rows)])
