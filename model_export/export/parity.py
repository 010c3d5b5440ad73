"""Named parity figures, the record each engine's check leaves in the manifest, and the
verdict.

Each figure is stored under its own name (hornet_bundle.Parity); `metric` says which
one the tolerance bounds:
- classify: `relative_l2_error` = ||got - ref|| / ||ref|| over all logits, with
  `top1_agreement`;
- segment: `max_relative_error` = max |got - ref| / max |ref|, with `pixel_agreement`;
- detect: `box_score_error` = max(box error / largest coordinate, score error) over
  detections paired one to one, with the masks' pixel agreement and its lower limit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model_export.export.errors import ParityError


def max_abs_error(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(ref.astype(np.float64) - got.astype(np.float64)).max(initial=0.0))


def max_relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    """The largest absolute difference over the largest reference magnitude."""
    max_abs = max_abs_error(ref, got)
    scale = float(np.abs(ref).max(initial=0.0))
    return max_abs / scale if scale > 0 else max_abs


def relative_l2_error(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def argmax_agreement(ref: np.ndarray, got: np.ndarray, axis: int) -> float:
    """The fraction of positions whose argmax over `axis` agrees."""
    return float((ref.argmax(axis) == got.argmax(axis)).mean())


def record(
    engine: str,
    reference: str,
    metric: str,
    tolerance: float,
    figures: dict,
    inputs: str,
    also_passed: bool = True,
) -> dict:
    """One manifest parity entry: passed when figures[metric] < tolerance (and
    `also_passed`, the task's other conditions)."""
    passed = bool(figures[metric] < tolerance) and also_passed
    return {
        "engine": engine,
        "reference": reference,
        "metric": metric,
        "tolerance": tolerance,
        "passed": passed,
        **figures,
        "inputs": inputs,
    }


def describe(entry: dict) -> str:
    """One line: the bounded figure against its tolerance, and the other figures."""
    metric = entry["metric"]
    others = ", ".join(
        f"{name.replace('_', ' ')} {_number(value)}"
        for name, value in entry.items()
        if name.endswith(("_error", "_agreement", "_paired")) and name != metric
    )
    verdict = "ok" if entry["passed"] else "FAILED"
    return (
        f"{entry['engine']} vs {entry['reference']}: {metric.replace('_', ' ')} "
        f"{entry[metric]:.3g} (tolerance {entry['tolerance']:g}), {others} [{verdict}]"
    )


def _number(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def raise_on_failure(parity: list[dict], out_dir: Path) -> None:
    """ParityError naming every failed engine, once the bundle is written."""
    failed = [entry for entry in parity if not entry["passed"]]
    if failed:
        raise ParityError(
            "parity check failed: "
            + "; ".join(f"{out_dir / p['engine']}: {describe(p)} ({p['inputs']})" for p in failed)
        )
