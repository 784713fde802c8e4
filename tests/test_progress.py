"""The study's live progress line: cell k of n, trial counts, best ratio so far, elapsed time and ETA."""

from __future__ import annotations

from types import SimpleNamespace

from pipeline.progress import StudyProgress


def _trial(trial_id: str, **result) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, last_result=result)


def test_a_cell_counts_trials_and_tracks_the_best_ratio(capsys):
    study = StudyProgress(num_cells=2, trials_per_cell=3)
    cell = study.cell(1, "ipndm-o4 NFE 6", baseline_loss=0.02)
    for trial_id in ("a", "b"):
        cell.on_trial_start(0, [], _trial(trial_id))
    assert "ETA" not in capsys.readouterr().out  # nothing ended yet: no estimate
    cell.on_trial_complete(0, [], _trial("a", final_val_loss=0.01, objective=0.01))
    cell.on_trial_complete(0, [], _trial("b", objective=0.05))  # stopped early: no final_val_loss
    cell.on_trial_start(0, [], _trial("c"))
    cell.on_trial_error(0, [], _trial("c"))
    line = capsys.readouterr().out.strip().splitlines()[-1]  # not a terminal: one line per event
    assert line.startswith("cell 2/2 ipndm-o4 NFE 6 | trials 3/3 ended (1 done, 1 stopped, 1 failed), 0 running")
    assert "best ratio 0.500" in line and "elapsed, ETA" in line
    assert study.trials_ended == 3 and study.eta_s() is not None
