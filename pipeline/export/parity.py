"""Does an exported file give model.keras's answers? Probability differences, top-1 agreement, latency."""

from __future__ import annotations

import time

import numpy as np

from pipeline.export.runtimes import Runner

MAX_DIFFERENCE = 1e-4  # largest absolute difference in any probability
MIN_AGREEMENT = 0.999  # fraction of images (classification) or pixels (segmentation) with the same top class


class ParityError(ValueError):
    """An exported file gives other answers than model.keras."""


def compare(reference: Runner, candidate: Runner, images: list[np.ndarray]) -> dict[str, float]:
    """Runs both on each image (batch 1, its own size) and measures how far apart they are.

    Args:
        reference: model.keras (float32).
        candidate: the exported file through its own runtime.
        images: uint8 RGB [height, width, 3] arrays.

    Returns:
        `max_abs_difference`, `top1_agreement` (the fraction of images, or of pixels for
        per-pixel outputs, whose highest-scoring class is the same), `latency_ms_per_image`
        (the candidate, batch 1, after one warm-up call) and `images`.
    """
    candidate(images[0][None])  # warm-up: graph building and memory allocation are not latency
    largest, agreeing, total, seconds = 0.0, 0, 0, 0.0
    for image in images:
        expected = np.asarray(reference(image[None]), dtype=np.float32)
        start = time.perf_counter()
        got = np.asarray(candidate(image[None]), dtype=np.float32)
        seconds += time.perf_counter() - start
        if got.shape != expected.shape:
            raise ParityError(f"output shape {got.shape} instead of {expected.shape} for a {image.shape} image")
        largest = max(largest, float(np.max(np.abs(got - expected))))
        agreeing += int(np.sum(got.argmax(-1) == expected.argmax(-1)))
        total += expected.argmax(-1).size
    return {"max_abs_difference": largest, "top1_agreement": agreeing / total,
            "agreement_of": "pixels" if expected.ndim > 2 else "images",
            "latency_ms_per_image": 1000 * seconds / len(images), "images": len(images)}


def failures(results: dict[str, dict]) -> list[str]:
    """One line per format whose results break the limits (empty when all pass)."""
    return [f"{name}: max |difference| {result['max_abs_difference']:.2e} (limit {MAX_DIFFERENCE:g}), "
            f"top-1 agreement {100 * result['top1_agreement']:.2f} % (limit {100 * MIN_AGREEMENT:g} %)"
            for name, result in results.items()
            if "max_abs_difference" in result and (result["max_abs_difference"] > MAX_DIFFERENCE
                                                   or result["top1_agreement"] < MIN_AGREEMENT)]
