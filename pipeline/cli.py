"""Command line shared by every study script: the common flags, overrides and one-line errors.

A study script defines ``make_config(args) -> StudyConfig`` (its frozen defaults, the smoke-test variant)
and calls ``main(make_config, description)``. Flags common to all studies:
``--address --tracking-uri --cache-dir --exports-dir --storage-dir --num-samples --nfe --solvers
--max-concurrent --gpus-per-trial --cpus-per-trial --no-resume --smoke-test``, and the evaluation stage's
``--fid-samples --fid-ref --inception-weights --eval-workers`` (any of them turns it on).

Parsing flags and building the study import only plain-data configs (``pipeline.study_config``), so ``--help``
and flag errors come back in well under a second; the driver (Ray, MLflow, torch) is imported when a study runs
or dry-runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from ld3.catalog import solver_info
from pipeline.errors import StudyInputError, as_input_error
from pipeline.evaluation.config import EvaluationConfig
from pipeline.search.space import SolverChoice
from pipeline.study_config import StudyConfig, StudyOptions, bundle_search

if TYPE_CHECKING:
    from pipeline.driver import StudyResult

ConfigFactory = Callable[[argparse.Namespace], StudyConfig]
# --learn-coefficients: SearchSpace.learn_coefficients (docs/method.md#learned-coefficients)
LEARN_COEFFICIENTS = {"off": (False,), "on": (True,), "search": (False, True)}
# Errors that mean "fix your input or environment": reported in one line, exit code 2. Nothing else is:
# an unexpected ValueError deep in a run is a bug, and keeps its traceback.
USER_ERRORS = (StudyInputError,)


def parse_solvers(text: str) -> tuple[SolverChoice, ...]:
    """``"unipc_bh1:3,ipndm"`` -> solver choices (order after a colon; the solver's highest order otherwise)."""
    choices = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, order = item.partition(":")
        if order and not order.isdigit():
            raise ValueError(f"--solvers item {item!r}: the order after ':' must be an integer, e.g. unipc_bh1:3")
        choices.append(SolverChoice(name, int(order) if order else _default_order(name)))
    if not choices:
        raise ValueError("--solvers is empty; give e.g. --solvers unipc_bh1:3,ipndm:4")
    return tuple(choices)


def _default_order(name: str) -> int:
    """A solver named without ``:order`` runs at the highest order it supports."""
    try:
        return max(solver_info(name).orders)
    except ValueError as err:
        raise ValueError(f"{err} (in --solvers)") from None


def parse_nfes(text: str) -> tuple[int, ...]:
    """``"4,6,8"`` -> (4, 6, 8); an empty item (``4,,6``) or a non-integer is an error."""
    try:
        nfes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--nfe must be comma-separated integers, e.g. 4,6,8, got {text!r}") from None
    if not nfes or min(nfes) < 1:
        raise ValueError(f"--nfe values must be integers >= 1, got {text!r}")
    return nfes


def _study_default(defaults: StudyConfig | None, describe: Callable[[StudyConfig], str]) -> str:
    return "" if defaults is None else f" (default: {describe(defaults)})"


def build_parser(description: str, defaults: StudyConfig | None = None) -> argparse.ArgumentParser:
    """The common flags; ``defaults`` (the script's study) fills in the defaults that ``--help`` shows."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke-test", action="store_true", help="tiny study for CI: few samples, trials and rounds")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray address ('auto' joins the cluster of this node) (default: $RAY_ADDRESS, else Ray in-process)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of an in-process Ray (default: all of this machine)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--cache-dir", default=os.environ.get("LD3_CACHE_DIR", "ld3_cache"),
                   help="teacher cache: folder or pyarrow URI (s3://...) (default: $LD3_CACHE_DIR, else ./ld3_cache)")
    p.add_argument("--exports-dir", default="exports",
                   help="the best schedules are written as JSON to <this folder>/<study>/ (default: ./exports)")
    p.add_argument("--storage-dir", default=os.environ.get("LD3_STORAGE_DIR", "ray_results"),
                   help="Tune experiment state, shared storage on a cluster (default: $LD3_STORAGE_DIR, else ./ray_results)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="Optuna trials per (solver, NFE)" + _study_default(defaults, lambda d: str(d.num_trials)))
    p.add_argument("--nfe", default=None, help="comma-separated NFEs, e.g. 4,6,8"
                   + _study_default(defaults, lambda d: ",".join(map(str, d.nfes))))
    p.add_argument("--solvers", default=None,
                   help="comma-separated solver[:order], e.g. unipc_bh1:3,ipndm:4 (no order: the highest the solver has)"
                   + _study_default(defaults, lambda d: ",".join(f"{c.name}:{c.order}" for c in d.solvers)))
    p.add_argument("--max-concurrent", type=int, default=None, help="trials running at once per cell"
                   + _study_default(defaults, lambda d: str(d.max_concurrent)))
    p.add_argument("--trials-per-bundle", type=int, default=None, metavar="K",
                   help="train K trials in one process and one batched solve (LD3Bundle): the search keeps the "
                        "trainer's rounds and batch size, K trials run at once unless --max-concurrent says "
                        "otherwise, and the trial resources go to each bundle" + _study_default(defaults, lambda d: str(d.trials_per_bundle)))
    p.add_argument("--gpus-per-trial", type=float, default=None, help="GPUs per trial (fractions share a GPU)"
                   + _study_default(defaults, lambda d: f"{d.gpus_per_trial:g}"))
    p.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial"
                   + _study_default(defaults, lambda d: f"{d.cpus_per_trial:g}"))
    p.add_argument("--learn-coefficients", choices=list(LEARN_COEFFICIENTS), default=None,
                   help="learn the multistep solver's coefficients too: off, on, or searched by Optuna"
                   + _study_default(defaults, lambda d: {frozenset(v): k for k, v in LEARN_COEFFICIENTS.items()}[
                       frozenset(d.search.learn_coefficients)]))
    p.add_argument("--no-resume", action="store_true", help="start a new MLflow parent run and new Tune experiments")
    p.add_argument("--dry-run", action="store_true",
                   help="check every input and print the study's plan, then exit without writing anything")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="show the libraries' own output too: Ray, Tune (its tables with -vv), MLflow, Optuna logging")
    evaluation = p.add_argument_group("evaluation stage (after the search; any of these turns it on)")
    evaluation.add_argument("--fid-samples", type=int, default=None, metavar="N",
                            help="samples per learned/baseline schedule (published FIDs: 50000)")
    evaluation.add_argument("--fid-ref", default=None, metavar="PATH",
                            help="FID reference statistics (.npz with mu, sigma) or a folder of real images")
    evaluation.add_argument("--inception-weights", default=None, metavar="PATH",
                            help="Inception-v3 FID weights (default: the torch hub cache)")
    evaluation.add_argument("--eval-workers", type=int, default=None, metavar="K",
                            help="Ray actors sampling in parallel (each takes a trial's CPUs/GPUs)")
    return p


def apply_overrides(config: StudyConfig, args: argparse.Namespace) -> StudyConfig:
    """The common flags that change the study (None means: keep the script's default)."""
    overrides = {
        "num_trials": args.num_samples,
        "nfes": None if args.nfe is None else parse_nfes(args.nfe),
        "solvers": None if args.solvers is None else parse_solvers(args.solvers),
        "max_concurrent": args.max_concurrent,
        "trials_per_bundle": args.trials_per_bundle,
        "gpus_per_trial": args.gpus_per_trial,
        "cpus_per_trial": args.cpus_per_trial,
    }
    # everything in one replace: StudyConfig checks the options together
    search = config.search
    if args.learn_coefficients is not None:
        search = replace(search, learn_coefficients=LEARN_COEFFICIENTS[args.learn_coefficients])
    if (args.trials_per_bundle or 1) > 1:  # a bundle's trials share rounds and batch size; K run at once by default
        search = bundle_search(search, config.trainer)
        overrides["max_concurrent"] = args.max_concurrent or args.trials_per_bundle
    if search != config.search:
        overrides["search"] = search
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    return _apply_evaluation_flags(config, args)


def _apply_evaluation_flags(config: StudyConfig, args: argparse.Namespace) -> StudyConfig:
    """The evaluation flags change the script's EvaluationConfig, or turn one on with a trial's resources."""
    flags = {"num_samples": args.fid_samples, "fid_reference": args.fid_ref,
             "inception_weights": args.inception_weights, "concurrency": args.eval_workers}
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return config
    base = config.evaluation or EvaluationConfig(num_gpus_per_actor=config.gpus_per_trial,
                                                 num_cpus_per_actor=config.cpus_per_trial)
    return replace(config, evaluation=replace(base, **given))


def one_line(err: BaseException) -> str:
    """The first line of an error's message; for an error raised in a Ray worker, of the worker's own error
    (``ray.exceptions.RayTaskError.cause``; the wrapper's first line is only ``ray::task() (pid=…)``)."""
    cause = getattr(err, "cause", None)
    err = cause if isinstance(cause, BaseException) else err
    return str(err).splitlines()[0] if str(err).strip() else type(err).__name__


def options_from_args(args: argparse.Namespace) -> StudyOptions:
    return StudyOptions(address=args.address, num_cpus=args.num_cpus, tracking_uri=args.tracking_uri,
                        cache_dir=args.cache_dir, exports_dir=args.exports_dir, storage_dir=args.storage_dir,
                        resume=not args.no_resume, verbose=args.verbose)


def plan(study: StudyConfig, options: StudyOptions) -> str:
    """What ``--dry-run`` prints: the study's shape and where it would write (all inputs already checked)."""
    from pipeline.recording.exports import study_exports_dir
    from pipeline.recording.tracking import resolve_tracking_uri

    cells = len(study.solvers) * len(study.nfes)
    teacher = study.teacher
    return "\n".join([
        f"Study {study.name!r} on {study.model.model_id}: inputs checked, nothing written (--dry-run).",
        f"  teacher:    {teacher.solver}-o{teacher.order} NFE {teacher.nfe}, {teacher.num_samples} samples "
        f"({study.num_train} train + {study.num_validation} validation)",
        f"  cells:      {cells} = solvers {', '.join(c.label for c in study.solvers)} x NFE "
        f"{', '.join(map(str, study.nfes))}; {study.num_trials} trials each, {study.max_concurrent} at once"
        + (f", {study.trials_per_bundle} per bundle (one batched solve)" if study.trials_per_bundle > 1 else ""),
        f"  evaluation: {'off' if study.evaluation is None else f'{study.evaluation.num_samples} samples per schedule'}",
        f"  tracking:   {resolve_tracking_uri(options.tracking_uri, options.work_dir)}",
        f"  exports:    {study_exports_dir(options.exports_dir, study.name)}",
        f"  cache:      {options.cache_dir}    Tune state: {options.storage_dir}",
    ])


def report(result: StudyResult) -> str:
    """The closing text: the table, and where everything is."""
    from pipeline.evaluation.report import format_evaluation_table
    from pipeline.summary import format_table

    lines = [
        f"Study {result.name!r} on {result.model_id}: learned (LD3) vs best baseline, validation loss on the",
        "teacher's validation set (original latents); ratio < 1 means the learned schedule wins.",
        "",
        format_table(result.cells),
        *[f"note: {cell.export_note}" for cell in result.cells if cell.export_note],
        *([] if result.evaluation is None else ["", format_evaluation_table(result.evaluation)]),
        "",
        f"Exported schedules: {result.exports_dir}",
        f"Teacher data:       {result.cache}",
        f"MLflow:             {result.tracking_uri} (experiment {result.experiment_id}, parent run {result.parent_run_id})",
        f"Open the UI with:   mlflow ui --backend-store-uri {result.tracking_uri}",
    ]
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Only warnings from Ray, Ray Data (no progress bars), Tune, MLflow and Optuna; the study prints its own progress."""
    import optuna
    import ray.data

    for name in ("ray", "ray.train", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Data warns that its progress bars are off; Tune that result processing is slow on a loaded machine;
    # Ray that the in-process cluster it starts uses token authentication (its default, kept).
    for name in ("ray.data", "ray.tune", "ray._private.authentication"):
        logging.getLogger(name).setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False


def main(make_config: ConfigFactory, description: str, argv: Sequence[str] | None = None,
         parser: argparse.ArgumentParser | None = None, defaults: StudyConfig | None = None) -> int:
    """Parse flags, run the study, print the report; bad input -> one line on stderr and exit code 2; a cell
    without a finished trial (no export) -> exit code 1. ``defaults``: the script's study, whose values ``--help`` shows."""
    parser = parser or build_parser(description, defaults)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        with as_input_error():  # building the config from the flags only checks input
            config = apply_overrides(make_config(args), args)
        options = options_from_args(args)
        if not args.verbose:
            _quiet_libraries()
        from pipeline.driver import check_study, run_study  # Ray, MLflow and torch: only once a study (dry-)runs

        if args.dry_run:
            check_study(config, options)
            print(plan(config, options))
            return 0
        result = run_study(config, options)
    except USER_ERRORS as err:
        if args.verbose:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(report(result))
    return exit_code(result)


def exit_code(result: StudyResult) -> int:
    """0 when every cell exported a schedule; otherwise 1 and a line naming the cells without one."""
    from pipeline.summary import incomplete_cells

    missing = incomplete_cells(result.cells)
    if missing:
        print(f"error: no trial finished (ok/stopped/failed) in {missing}; the MLflow trial runs' 'failure' tags "
              "say why; rerun the same command to retry trials that failed for another reason than diverging",
              file=sys.stderr)
    return 1 if missing else 0


def study_names() -> list[str]:
    """The study scripts of ``studies/`` (the ``ld3-study`` command's first argument)."""
    import pkgutil

    import studies

    return sorted(m.name for m in pkgutil.iter_modules(studies.__path__) if not m.name.startswith("_"))


def study_command(argv: Sequence[str] | None = None) -> int:
    """``ld3-study <study> [flags]`` (the installed console script): runs ``studies/<study>.py`` with the flags,
    e.g. ``ld3-study gmm --smoke-test``."""
    import runpy

    argv = list(sys.argv[1:] if argv is None else argv)
    names = study_names()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: ld3-study {{{','.join(names)}}} [flags]   (ld3-study <study> --help lists the flags)")
        return 0 if argv else 2
    if argv[0] not in names:
        print(f"error: unknown study {argv[0]!r}; choose one of {', '.join(names)}", file=sys.stderr)
        return 2
    saved, sys.argv = sys.argv, [f"ld3-study {argv[0]}", *argv[1:]]  # the script parses sys.argv; [0] is its prog name
    try:
        runpy.run_module(f"studies.{argv[0]}", run_name="__main__")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved
    return 0
