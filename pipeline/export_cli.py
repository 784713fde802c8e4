"""Work with exported schedules: ``python -m pipeline.export_cli show|convert|compare|interpolate``.

- ``show FILE [--plot PNG]``: the grid as a table (σ, σ_eval, native time) and a log-σ plot.
- ``convert FILE [--to FORMAT ...] [--ignore-decoupled] [--output-dir DIR]``: the lists other samplers take
  (k-diffusion sigmas, ComfyUI SIGMAS string, diffusers sigmas / integer timesteps), one file each.
- ``compare FILE...``: learned against the best baseline of each export, across solvers and NFE (a table).
- ``interpolate FILE --steps M [--scheduler-config JSON] [--output FILE]``: the schedule resized to M steps in
  log σ, written as an export labelled ``mode: interpolated`` (not learned, no metrics).

Bad input: one line ``error: ...`` on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ld3.catalog import check_order
from pipeline.fileio import atomic_write_text, ensure_writable_dir
from pipeline.recording.export_tools import interpolated_export, native_schedule
from pipeline.recording.exports import DIFFUSERS_TIME_SCHEDULES, INTERPOLATED_MODE, ExportedSchedule, load_schedule

# format name -> (file suffix, the text written for an export; ``ignore`` drops the decoupling)
FORMATS: dict[str, tuple[str, Callable[[ExportedSchedule, bool], str]]] = {
    "k-diffusion": (".k_diffusion_sigmas.json", lambda s, ignore: json.dumps(s.k_diffusion_sigmas(ignore_decoupled=ignore))),
    "comfyui": (".comfyui_sigmas.txt", lambda s, ignore: s.comfyui_sigmas(ignore_decoupled=ignore)),
    "diffusers-sigmas": (".diffusers_sigmas.json", lambda s, ignore: json.dumps(s.diffusers_sigmas(ignore_decoupled=ignore))),
    "diffusers-timesteps": (".diffusers_timesteps.json",
                            lambda s, ignore: json.dumps(s.diffusers_timesteps(ignore_decoupled=ignore))),
}


def load_export(path: str) -> ExportedSchedule:
    """``load_schedule`` and a check that the export's solver and order are ones ``ld3.solvers`` runs."""
    exported = load_schedule(path)
    try:
        check_order(exported.solver, exported.order)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return exported


# ---- show ---------------------------------------------------------------------------------------
def grid_table(exported: ExportedSchedule) -> str:
    """Header lines and one row per grid point: i, σ_i, σ'_i, native t_i, t'_i."""
    kind = "NOT LEARNED (interpolated)" if exported.mode == INTERPOLATED_MODE else f"mode {exported.mode}"
    lines = [
        (f"{exported.model}  {exported.solver}-o{exported.order}  NFE {exported.nfe}  N {exported.n_steps}  "
         f"{exported.noise_schedule}  {kind}  decoupled: {'yes' if exported.decoupled else 'no'}"),
        "metrics: " + (", ".join(f"{k}={v:.6g}" for k, v in sorted(exported.metrics.items())) or "none"),
        f"{'i':>3} {'sigma':>14} {'sigma_eval':>14} {'t':>12} {'t_eval':>12}",
    ]
    evals = exported.sigmas_eval if exported.decoupled else exported.sigmas
    times_eval = exported.timesteps_eval if exported.decoupled else exported.timesteps
    for i in range(exported.n_steps + 1):
        lines.append(f"{i:>3} {float(exported.sigmas[i]):>14.6g} {float(evals[i]):>14.6g} "
                     f"{float(exported.timesteps[i]):>12.6g} {float(times_eval[i]):>12.6g}")
    return "\n".join(lines)


def _show(args: argparse.Namespace) -> str:
    from pipeline.recording.plots import plot_schedule  # matplotlib: only for this command

    exported = load_export(args.file)
    plot_path = Path(args.plot or f"{Path(args.file).stem}.png")
    ensure_writable_dir(plot_path.parent, "--plot")
    title = f"{exported.model}  {exported.solver}-o{exported.order}  NFE {exported.nfe}"
    figure = plot_schedule(exported.sigmas, exported.sigmas_eval, title=title)
    figure.savefig(plot_path)
    return f"{grid_table(exported)}\nplot: {plot_path}"


# ---- convert ------------------------------------------------------------------------------------
def _convert(args: argparse.Namespace) -> str:
    exported = load_export(args.file)
    native_time = exported.noise_schedule in DIFFUSERS_TIME_SCHEDULES
    names = args.to or [name for name in FORMATS if native_time or name != "diffusers-timesteps"]
    texts = {name: FORMATS[name][1](exported, args.ignore_decoupled) for name in names}  # all checked before writing
    directory = ensure_writable_dir(args.output_dir, "--output-dir")
    lines = []
    for name, text in texts.items():
        path = atomic_write_text(directory / f"{Path(args.file).stem}{FORMATS[name][0]}", text + "\n")
        lines.append(f"{name:>20}: {path}\n{'':>22}{text}")
    if exported.decoupled:
        lines.append("note: these lists are the step grid alone (--ignore-decoupled): the decoupled sigmas_eval are lost")
    return "\n".join(lines)


# ---- compare ------------------------------------------------------------------------------------
def best_baseline(metrics: dict[str, float], key: str = "final_val_loss") -> tuple[str, float] | None:
    """(name, value) of the baseline with the lowest ``baseline_<name>_<key>`` metric, or None."""
    prefix, suffix = "baseline_", f"_{key}"
    found = {k[len(prefix):-len(suffix)]: v for k, v in metrics.items() if k.startswith(prefix) and k.endswith(suffix)}
    return min(found.items(), key=lambda item: item[1]) if found else None


def compare_table(exports: Sequence[ExportedSchedule]) -> str:
    """One row per export (sorted by model, solver, order, NFE): learned val loss against the best baseline's."""
    header = (f"{'model':<16} {'solver':<14} {'NFE':>4} {'dec':>3} {'mode':<12} {'best baseline':<16} "
              f"{'val base':>10} {'val learned':>11} {'ratio':>6} {'FD base':>9} {'FD learned':>10}")
    rows = [header, "-" * len(header)]
    for s in sorted(exports, key=lambda e: (e.model, e.solver, e.order, e.nfe)):
        base = best_baseline(s.metrics)
        learned = s.metrics.get("final_val_loss")
        fd_base = s.metrics.get(f"baseline_{base[0]}_fd_exact") if base else None
        ratio = learned / base[1] if base and learned is not None and base[1] > 0 else None
        rows.append(
            f"{s.model[:16]:<16} {f'{s.solver}-o{s.order}':<14} {s.nfe:>4} {'yes' if s.decoupled else 'no':>3} "
            f"{s.mode[:12]:<12} {base[0] if base else '-':<16} {_number(base[1] if base else None):>10} "
            f"{_number(learned):>11} {_number(ratio, '.3f'):>6} {_number(fd_base, '.4f'):>9} "
            f"{_number(s.metrics.get('fd_exact'), '.4f'):>10}"
        )
    return "\n".join(rows)


def _number(value: float | None, spec: str = ".3e") -> str:
    return "-" if value is None else format(value, spec)


def _compare(args: argparse.Namespace) -> str:
    return compare_table([load_export(path) for path in args.files])


# ---- interpolate --------------------------------------------------------------------------------
def _interpolate(args: argparse.Namespace) -> str:
    exported = load_export(args.file)
    config = _read_json(args.scheduler_config, "--scheduler-config") if args.scheduler_config else None
    resized = interpolated_export(exported, args.steps, native_schedule(exported, config), Path(args.file).name)
    output = Path(args.output or f"{Path(args.file).stem}__interpolated-n{args.steps}.json")
    ensure_writable_dir(output.parent, "--output")
    path = atomic_write_text(output, resized.to_json())
    return f"{grid_table(resized)}\nwritten: {path} (not learned: log-sigma interpolation, no metrics)"


def _read_json(path: str, flag: str) -> dict[str, Any]:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag}: {path} does not exist; pass the model's scheduler/scheduler_config.json") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag}: {path} is not valid JSON ({err})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{flag}: {path} must hold a JSON object (a diffusers scheduler config)")
    return document


# ---- main ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export_cli", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="table and log-sigma plot of one export")
    show.add_argument("file")
    show.add_argument("--plot", help="PNG to write (default: <export name>.png here)")
    show.set_defaults(run=_show)
    convert = commands.add_parser("convert", help="the lists other samplers take, one file per format")
    convert.add_argument("file")
    convert.add_argument("--to", action="append", choices=sorted(FORMATS), help="format (repeatable; default: all)")
    convert.add_argument("--ignore-decoupled", action="store_true",
                         help="decoupled exports: hand over the step grid alone (the sigmas_eval are lost)")
    convert.add_argument("--output-dir", default=".", help="folder of the converted files (default: here)")
    convert.set_defaults(run=_convert)
    compare = commands.add_parser("compare", help="learned vs best baseline of several exports (a table)")
    compare.add_argument("files", nargs="+")
    compare.set_defaults(run=_compare)
    interpolate = commands.add_parser("interpolate", help="resize to another step count in log sigma (not learned)")
    interpolate.add_argument("file")
    interpolate.add_argument("--steps", type=int, required=True, help="number of steps N of the new grid")
    interpolate.add_argument("--scheduler-config", help="the model's scheduler_config.json (VP discrete models)")
    interpolate.add_argument("--output", help="export file to write (default: <name>__interpolated-n<M>.json here)")
    interpolate.set_defaults(run=_interpolate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input -> one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        print(args.run(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
