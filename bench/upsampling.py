"""Benchmark: x32 bilinear upsampling of class scores, dense vs per-class kernel vs tf.image.resize.

Each case runs in its own process, so its peak resident memory is its own. Weight bytes are exact;
time is the median of repeated compiled calls on one batch of stride-32 score maps.

    python bench/upsampling.py --classes 21 81 1000 --size 16 --repeats 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
FACTOR = 32
DENSE_LIMIT_BYTES = 4 << 30  # a dense kernel above this would not fit with its gradients in 24 GiB


def measure(form: str, classes: int, size: int, repeats: int) -> dict:
    """Runs one case in this process and returns its figures."""
    sys.path.insert(0, str(ROOT))
    import keras
    import numpy as np
    import tensorflow as tf

    from pipeline.upsampling import bilinear_upsampling_layer

    scores = tf.constant(np.random.default_rng(0).normal(size=(1, size, size, classes)).astype("float32"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if form == "resize":
        layer, weights = None, 0
        call = tf.function(lambda x: tf.image.resize(x, (size * FACTOR, size * FACTOR), method="bilinear"))
    else:
        layer = bilinear_upsampling_layer(FACTOR, classes, form=form)
        layer.build(scores.shape)
        weights = sum(int(np.prod(w.shape)) for w in layer.weights) * 4
        call = tf.function(lambda x: layer(x))
    call(scores).numpy()  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(scores).numpy()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"form": form, "classes": classes, "weight_bytes": weights, "median_ms": statistics.median(times) * 1e3,
            "peak_rss_mib": peak / 1024, "added_rss_mib": (peak - before) / 1024,
            "keras": keras.__version__, "tensorflow": tf.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 81, 1000])
    parser.add_argument("--size", type=int, default=16, help="score map side (x32 gives the output side)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        form, classes = args.case.split(":")
        print(json.dumps(measure(form, int(classes), args.size, args.repeats)))
        return

    rows = []
    for classes in args.classes:
        for form in ("resize", "per_class", "dense"):
            dense_bytes = (2 * FACTOR) ** 2 * classes * classes * 4
            if form == "dense" and dense_bytes > DENSE_LIMIT_BYTES:
                rows.append({"form": form, "classes": classes, "weight_bytes": dense_bytes, "median_ms": None,
                             "added_rss_mib": None})
                continue
            result = subprocess.run([sys.executable, __file__, "--case", f"{form}:{classes}", "--size",
                                     str(args.size), "--repeats", str(args.repeats)],
                                    capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    versions = next((r for r in rows if "keras" in r), {})
    print(f"# x{FACTOR} bilinear upsampling of a 1x{args.size}x{args.size}xC score map to "
          f"{args.size * FACTOR}x{args.size * FACTOR}, median of {args.repeats} compiled calls, one process per case")
    print(machine(tensorflow=versions.get("tensorflow"), keras=versions.get("keras")))
    print("| classes | form | weight bytes | memory added (MiB) | time (ms) | time vs resize |")
    print("|---|---|---|---|---|---|")
    for classes in args.classes:
        resize = next(r for r in rows if r["classes"] == classes and r["form"] == "resize")
        for row in (r for r in rows if r["classes"] == classes):
            if row["median_ms"] is None:
                memory, milliseconds, ratio = "not run: too large", "-", "-"
            else:
                memory = f"{row['added_rss_mib']:.0f}"
                milliseconds = f"{row['median_ms']:.1f}"
                ratio = f"{row['median_ms'] / resize['median_ms']:.2f}x"
            print(f"| {classes} | {row['form']} | {row['weight_bytes']:,} | {memory} | {milliseconds} | {ratio} |")

if __name__ == "__main__":
    main()
