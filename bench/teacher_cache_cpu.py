"""CPU benchmark: teacher generation through the Ray teacher cache vs the same solve in-process.

Solves the embedded GMM teacher (UniPC-3, NFE 20, EDM rho=7) for ``--samples`` samples in batches
of ``--batch-size``, and times

* in-process: ``pipeline.teacher.solve_teacher`` batch by batch in this process with one torch
  thread, which is what one Ray actor with ``num_cpus=1`` gets (model built outside the timing);
* through Ray: ``TeacherCache.get_or_generate`` on a cold cache with 1..``--actors`` actors: actor
  start, model build, solve, Parquet parts with checksums, manifest. Each actor count is timed on
  one batch (the fixed cost of a generation) and on all samples; the difference gives the marginal
  throughput once the actors run;
* a cache hit: lookup plus ``load()`` with every checksum verified.

Ratios are wall time (or marginal time per sample) over the in-process solve; the ideal for k actors
is 1/k. Each time is the minimum of ``--repeats`` interleaved runs. Prints a Markdown table; ``--out`` also writes JSON. Example:

    python bench/teacher_cache_cpu.py --out bench/teacher_cache_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace

import ray
import torch

from pipeline.models.spec import ModelSpec, gmm_spec
from pipeline.teacher.cache import TeacherCache
from pipeline.teacher.solve import TeacherConfig, solve_teacher


def in_process_seconds(spec: ModelSpec, config: TeacherConfig) -> float:
    """Wall time of the teacher solve in this process with one torch thread, batch by batch."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = spec.build("cpu", config.torch_dtype)
        seeds = config.sample_seeds()
        start = time.perf_counter()
        for first in range(0, config.num_samples, config.batch_size):
            solve_teacher(model, config, seeds[first : first + config.batch_size])
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)


def cold_generation_seconds(spec: ModelSpec, config: TeacherConfig, root: str) -> float:
    """Wall time of a cache-miss request into the empty folder ``root`` (so the actors really run)."""
    start = time.perf_counter()
    entry = TeacherCache(root).get_or_generate(spec, config)
    seconds = time.perf_counter() - start
    assert not entry.hit, f"{root} must start empty"
    return seconds


def cache_hit_seconds(spec: ModelSpec, config: TeacherConfig, root: str) -> float:
    """Wall time of a cache-hit request plus load() with checksum verification."""
    start = time.perf_counter()
    entry = TeacherCache(root).get_or_generate(spec, config)
    entry.load()
    seconds = time.perf_counter() - start
    assert entry.hit, f"{root} must hold the data already"
    return seconds


def timings(spec: ModelSpec, config: TeacherConfig, max_actors: int, repeats: int, scratch: str) -> list[dict]:
    """Table rows: in-process, Ray cold cache per actor count (one batch and all samples), cache hit.

    The measurements are interleaved round by round and each time is the minimum over ``repeats``
    rounds, so a shared machine's load disturbs all modes alike and the least disturbed run counts.
    Each cold run writes into its own empty folder.
    """
    n, batch = config.num_samples, config.batch_size
    runs: dict[str, list[float]] = {}
    for r in range(repeats):
        runs.setdefault("in-process", []).append(in_process_seconds(spec, config))
        for actors in range(1, max_actors + 1):
            one_batch = replace(config, num_samples=batch, concurrency=actors)
            runs.setdefault(f"fixed-{actors}", []).append(cold_generation_seconds(spec, one_batch, f"{scratch}/one-batch-{actors}-{r}"))
            everything = replace(config, concurrency=actors)
            runs.setdefault(f"total-{actors}", []).append(cold_generation_seconds(spec, everything, f"{scratch}/all-{actors}-{r}"))
        runs.setdefault("hit", []).append(cache_hit_seconds(spec, config, f"{scratch}/all-{max_actors}-0"))
    best = {name: min(values) for name, values in runs.items()}
    base = best["in-process"]
    rows = [{"mode": "in-process solve", "workers": "1 thread", "seconds": base, "fixed_seconds": 0.0, "marginal_samples_per_s": n / base}]
    for actors in range(1, max_actors + 1):
        fixed, total = best[f"fixed-{actors}"], best[f"total-{actors}"]
        rows.append({
            "mode": "Ray cold cache: generate + write",
            "workers": f"{actors} actor{'s' * (actors > 1)}",
            "seconds": total,
            "fixed_seconds": fixed,
            "marginal_samples_per_s": (n - batch) / max(total - fixed, 1e-9),
        })  # fmt: skip
    rows.append({"mode": "Ray cache hit: load + verify", "workers": "driver", "seconds": best["hit"], "fixed_seconds": None, "marginal_samples_per_s": None})
    for row in rows:
        row["time_ratio"] = row["seconds"] / base
        rate = row["marginal_samples_per_s"]
        row["marginal_time_ratio"] = None if rate is None else (n / base) / rate
    return rows


def run(spec: ModelSpec, samples: int, batch_size: int, nfe: int, max_actors: int, repeats: int) -> dict:
    config = TeacherConfig(nfe=nfe, num_samples=samples, batch_size=batch_size)
    start = time.perf_counter()
    ray.init(num_cpus=max_actors, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray_init = time.perf_counter() - start
    try:
        with tempfile.TemporaryDirectory() as scratch:
            rows = timings(spec, config, max_actors, repeats, scratch)
    finally:
        ray.shutdown()
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_1min_at_end": os.getloadavg()[0]},
        "settings": {"model": spec.describe(), "solver": config.solver, "order": config.order, "nfe": nfe, "samples": samples, "batch_size": batch_size, "dtype": config.dtype, "repeats": repeats},
        "ray_init_seconds": ray_init,
        "rows": rows,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(result: dict) -> str:
    lines = [
        "| mode | workers | wall s | time / in-process | fixed s (1 batch) | marginal samples/s | marginal time / in-process |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['mode']} | {r['workers']} | {r['seconds']:.2f} | {r['time_ratio']:.2f} | {_fmt(r['fixed_seconds'], '.2f')} "
            f"| {_fmt(r['marginal_samples_per_s'], '.0f')} | {_fmt(r['marginal_time_ratio'], '.2f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1024, help="samples per timed generation")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per actor call / Parquet part")
    parser.add_argument("--nfe", type=int, default=20, help="teacher NFE (UniPC-3, EDM rho=7 grid)")
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"), help="GMM sample shape")
    parser.add_argument("--actors", type=int, default=2, help="time 1..ACTORS actors; Ray gets ACTORS CPUs")
    parser.add_argument("--repeats", type=int, default=3, help="report the minimum over this many runs of each timing")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args()
    if args.samples <= args.batch_size:
        parser.error(f"--samples ({args.samples}) must exceed --batch-size ({args.batch_size}) to separate fixed and marginal cost")
    result = run(gmm_spec(shape=args.shape), args.samples, args.batch_size, args.nfe, args.actors, args.repeats)
    print(f"ray.init: {result['ray_init_seconds']:.1f} s (not in the table); 1-min load average {result['machine']['load_average_1min_at_end']:.1f}")
    print(markdown_table(result))
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
