"""Throughput of FID feature extraction and statistics on one device (random Inception weights: same cost).

    python bench/fid_features.py --device cuda --out fid_features.json

Prints images/s of the Inception-v3 feature pass (uint8 32x32 inputs resized to 299, as for CIFAR-10)
per batch size, the cost of the float64 statistics update, and the time to FID for 50,000 samples.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ld3.fid import FEATURE_DIM, FeatureStatsAccumulator, FIDInceptionV3, InceptionFeatureExtractor, fid_from_stats


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="50,200,500")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    extractor = InceptionFeatureExtractor(FIDInceptionV3(), torchscript=False, weights_name="random").to(device)
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
        features = extractor(images)
        accumulator = FeatureStatsAccumulator()
        with torch.no_grad():
            extract_s = timed(lambda: extractor(images), device, args.repeats)  # noqa: B023 - called at once
        update_s = timed(lambda: accumulator.update(features), device, args.repeats)  # noqa: B023 - called at once
        rows.append({"batch": batch, "images_per_s": batch / extract_s, "stats_update_ms": 1e3 * update_s,
                     "minutes_for_50k": 50_000 * (extract_s + update_s) / batch / 60})
    accumulator = FeatureStatsAccumulator()
    accumulator.update(torch.randn(4096, FEATURE_DIM, device=device))
    stats = accumulator.stats()
    fid_s = timed(lambda: fid_from_stats(stats, stats), torch.device("cpu"), 1)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"{'batch':>6} {'images/s':>10} {'stats update ms':>16} {'min for 50k':>12}")
    for row in rows:
        print(f"{row['batch']:>6} {row['images_per_s']:>10.0f} {row['stats_update_ms']:>16.2f} "
              f"{row['minutes_for_50k']:>12.2f}")
    print(f"Fréchet distance of 2048-d statistics (float64, CPU): {fid_s:.2f} s")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": str(device), "rows": rows, "frechet_s": fid_s}, handle, indent=2)


if __name__ == "__main__":
    main()
