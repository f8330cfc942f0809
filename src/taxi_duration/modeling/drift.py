"""How a scored month's trips differ from the month the model was trained on.

A `trip_profile` summarizes one month's trips (count, trip-distance and duration
distributions over fixed bins); the training notebook stores its training month's profile in the
servable model's metadata, and the scoring notebook compares the scored month with it. Distribution
shifts are measured as the population stability index (PSI) over those bins: under 0.1 is
usually read as stable, 0.1-0.25 as a moderate shift, above 0.25 as a large one.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import pandas as pd

# Inner bin edges; the first bin is everything below the first edge, the last everything above the last.
DISTANCE_EDGES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 15.0, 20.0)  # miles
DURATION_EDGES = (5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0)  # minutes, within the 1-60 window
# An empty bin on one side would make the PSI infinite; shares are floored at this.
PSI_FLOOR = 1e-4
PSI_MODERATE, PSI_LARGE = 0.1, 0.25


def _distribution(values: Any, edges: tuple[float, ...]) -> dict[str, Any] | None:
    array = np.asarray(values, dtype="float64")
    array = array[np.isfinite(array)]
    if array.size == 0:
        return None
    counts = np.bincount(np.searchsorted(edges, array, side="right"), minlength=len(edges) + 1)
    return {
        "edges": list(edges),
        "shares": (counts / array.size).round(6).tolist(),
        "mean": round(float(array.mean()), 4),
        "median": round(float(np.median(array)), 4),
        "p95": round(float(np.quantile(array, 0.95)), 4),
    }


def trip_profile(month: str, distance: Any, duration: Any | None) -> dict[str, Any]:
    """One month's trips in figures; `duration` None when the month's actual durations are unknown."""
    return {
        "month": month,
        "trips": len(distance),
        "distance": _distribution(distance, DISTANCE_EDGES),
        "duration": None if duration is None else _distribution(duration, DURATION_EDGES),
    }


def population_stability_index(expected_shares: list[float], actual_shares: list[float]) -> float:
    """sum((a - e) * ln(a / e)) over the bins, with shares floored at PSI_FLOOR."""
    expected = np.maximum(np.asarray(expected_shares, dtype="float64"), PSI_FLOOR)
    actual = np.maximum(np.asarray(actual_shares, dtype="float64"), PSI_FLOOR)
    if expected.shape != actual.shape:
        raise ValueError(
            f"the two distributions have {expected.size} and {actual.size} bins; they must share their bins"
        )
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def shift_label(psi: float) -> str:
    if psi < PSI_MODERATE:
        return "stable"
    return "moderate shift" if psi < PSI_LARGE else "large shift"


def unseen_pair_share(pairs: pd.Series, seen: set[str]) -> float:
    """Share of trips whose PU_DO pair the model's vectorizer never saw (they get no pair feature)."""
    if len(pairs) == 0:
        return 0.0
    return float((~pairs.isin(seen)).mean())


def drift_figures(training: dict[str, Any], scored: dict[str, Any], unseen_share: float) -> dict[str, float]:
    """The drift numbers a scoring run logs: counts, means, PSIs, the unseen-pair share."""
    figures = {
        "training_trips": float(training["trips"]),
        # All of the month's trips, those the model refused too: the training profile has all of its month's.
        "month_trips": float(scored["trips"]),
        "trip_count_ratio": scored["trips"] / training["trips"] if training["trips"] else float("nan"),
        "unseen_pu_do_share": unseen_share,
    }
    for feature in ("distance", "duration"):
        if training.get(feature) and scored.get(feature):
            figures[f"{feature}_psi"] = population_stability_index(
                training[feature]["shares"], scored[feature]["shares"]
            )
            figures[f"{feature}_mean_training"] = training[feature]["mean"]
            figures[f"{feature}_mean_scored"] = scored[feature]["mean"]
    return figures


def drift_table(training: dict[str, Any], scored: dict[str, Any], unseen_share: float) -> pd.DataFrame:
    """The report's drift table: each figure for the training month, the scored month, and the verdict."""
    rows = [
        (
            "trips (1-60 min)" if scored.get("duration") else "trips",
            training["trips"],
            scored["trips"],
            f"{scored['trips'] / training['trips']:.2f}x" if training["trips"] else "",
        )
    ]
    for feature, unit in (("distance", "mi"), ("duration", "min")):
        before, after = training.get(feature), scored.get(feature)
        if not (before and after):
            month = training["month"] if not before else scored["month"]
            what = "actual durations" if feature == "duration" else "trip distances"
            rows.append((f"{feature}", "", "", f"unavailable: {month} has no {what}"))
            continue
        psi = population_stability_index(before["shares"], after["shares"])
        for statistic in ("mean", "median", "p95"):
            rows.append((f"{feature} {statistic} ({unit})", before[statistic], after[statistic], ""))
        rows.append((f"{feature} PSI", "", round(psi, 4), shift_label(psi)))
    rows.append(("PU_DO pairs unseen in training (share of trips)", 0.0, round(unseen_share, 4), ""))
    return pd.DataFrame(
        rows, columns=["figure", training["month"] + " (training)", scored["month"] + " (scored)", "note"]
    )


def bin_labels(edges: list[float]) -> list[str]:
    """'<0.5', '0.5-1', ..., '>=20': the labels of the bins `edges` makes."""

    def text(value: float) -> str:
        return f"{value:g}"

    inner = [f"{text(low)}-{text(high)}" for low, high in pairwise(edges)]
    return [f"<{text(edges[0])}", *inner, f">={text(edges[-1])}"]
