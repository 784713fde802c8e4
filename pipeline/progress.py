"""The study's console: one live progress line instead of Tune's tables.

``StudyProgress`` follows the whole study (cell k of n, elapsed time, ETA from the trials done so far);
``StudyProgress.cell(...)`` returns a Tune ``Callback`` for one cell's ``Tuner`` that counts its trials
(done / running / stopped early / failed) and the best ratio learned / best baseline so far. On a terminal
the line is rewritten in place (at most once a second); otherwise a line is printed whenever a trial ends.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Callback

FINISHED_KEY = "final_val_loss"  # reported only by a trial that ran to its end
REFRESH_S = 1.0


@dataclass
class StudyProgress:
    """Progress of a whole study; ``total_trials`` = cells × trials per cell."""

    num_cells: int
    trials_per_cell: int
    started: float = field(default_factory=time.monotonic)
    trials_ended: int = 0  # over all cells, for the ETA
    _last_draw: float = float("-inf")
    _width: int = 0

    def cell(self, index: int, label: str, baseline_loss: float) -> CellProgress:
        """The Tune callback of cell ``index`` (0-based) named ``label`` whose best baseline scores ``baseline_loss``."""
        return CellProgress(self, index, label, baseline_loss)

    def eta_s(self) -> float | None:
        """Seconds left, assuming the remaining trials take as long on average as the ended ones."""
        if self.trials_ended == 0:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / self.trials_ended * (self.num_cells * self.trials_per_cell - self.trials_ended)

    def draw(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        interactive = sys.stdout.isatty()
        if interactive and not force and now - self._last_draw < REFRESH_S:
            return
        self._last_draw = now
        line = f"{text} | {_duration(now - self.started)} elapsed"
        eta = self.eta_s()
        line += "" if eta is None else f", ETA {_duration(eta)}"
        if interactive:
            sys.stdout.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        """End the live line (the next output starts on a fresh line)."""
        if self._width and sys.stdout.isatty():
            sys.stdout.write("\n")
            sys.stdout.flush()
        self._width = 0


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class CellProgress(Callback):
    """Tune callback of one cell: trial counts and the best finished trial, drawn on the study's line."""

    def __init__(self, study: StudyProgress, index: int, label: str, baseline_loss: float):
        self.study, self.index, self.label, self.baseline_loss = study, index, label, baseline_loss
        self.running: set[str] = set()
        self.counts = {"done": 0, "stopped": 0, "failed": 0}
        self.best_loss: float | None = None

    def text(self) -> str:
        c = self.counts
        ended = c["done"] + c["stopped"] + c["failed"]
        best = "" if self.best_loss is None else f" | best ratio {self.best_loss / self.baseline_loss:.3f}"
        return (f"cell {self.index + 1}/{self.study.num_cells} {self.label} | trials {ended}/{self.study.trials_per_cell}"
                f" ended ({c['done']} done, {c['stopped']} stopped, {c['failed']} failed), {len(self.running)} running{best}")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self.study.draw(self.text(), force=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if FINISHED_KEY in result:
            self.counts["done"] += 1
            loss = float(result[FINISHED_KEY])
            self.best_loss = loss if self.best_loss is None else min(self.best_loss, loss)
        else:
            self.counts["stopped"] += 1
        self._ended(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.counts["failed"] += 1
        self._ended(trial)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if sys.stdout.isatty():
            self.study.draw(self.text())

    def _ended(self, trial: Any) -> None:
        self.running.discard(trial.trial_id)
        self.study.trials_ended += 1
        self.study.draw(self.text(), force=True)
