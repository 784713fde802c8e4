"""Wall time of ``--help`` for every study script and for ``ld3-study gmm --help`` (issue 12: under a second).

Each command runs ``--repeats`` times in a fresh interpreter (subprocess, the repository on PYTHONPATH); the table
gives the median and the spread, beside a bare ``python -c pass`` (the interpreter's own start-up). ``--repo``
times another checkout (e.g. an older commit unpacked with ``git archive``), ``--scripts`` a subset.

    python bench/cli_startup.py
    python bench/cli_startup.py --repo /tmp/before --scripts gmm --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LD3_STUDY = "import sys; from pipeline.cli import study_command; sys.exit(study_command(sys.argv[1:]))"


def commands(repo: Path, scripts: list[str]) -> dict[str, list[str]]:
    """Label -> argv of each timed command."""
    timed = {"python -c pass (interpreter only)": [sys.executable, "-c", "pass"]}
    timed |= {f"studies/{name}.py --help": [sys.executable, str(repo / "studies" / f"{name}.py"), "--help"]
              for name in scripts}
    timed["ld3-study gmm --help"] = [sys.executable, "-c", LD3_STUDY, "gmm", "--help"]
    return timed


def wall_times(argv: list[str], repo: Path, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` runs of ``argv`` (it must exit 0)."""
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=REPO, help="checkout to time (default: this one)")
    p.add_argument("--scripts", nargs="*", default=None, help="study scripts to time (default: every one)")
    p.add_argument("--repeats", type=int, default=5, help="runs per command (default: 5)")
    args = p.parse_args()
    repo = args.repo.resolve()
    scripts = args.scripts or sorted(f.stem for f in (repo / "studies").glob("*.py") if not f.stem.startswith("_"))
    print(f"{'command':<40} {'median s':>9} {'min s':>7} {'max s':>7}   ({args.repeats} runs each, {repo})")
    for label, argv in commands(repo, scripts).items():
        times = wall_times(argv, repo, args.repeats)
        print(f"{label:<40} {statistics.median(times):>9.3f} {min(times):>7.3f} {max(times):>7.3f}")


if __name__ == "__main__":
    main()
