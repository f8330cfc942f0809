"""Figures the notebooks show. Each function takes data and returns a matplotlib Figure."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from taxi_duration.modeling.features import MAX_DURATION_MINUTES, MIN_DURATION_MINUTES


class ReportFigure(Figure):
    """A Figure that tells the notebook front end (and so the HTML reports) its alt text.

    IPython keeps the metadata of `_repr_mimebundle_` while matplotlib's inline formatter
    renders the PNG; the report template writes `alt` from it.
    """

    def alt_text(self) -> str:
        parts = []
        for axes in self.axes:
            title = axes.get_title()
            x_label, y_label = axes.get_xlabel(), axes.get_ylabel()
            axis = f"{y_label} by {x_label}" if x_label and y_label else (y_label or x_label)
            parts.append(": ".join(part for part in (title, axis) if part))
        return "; ".join(part for part in parts if part) or "figure"

    def _repr_mimebundle_(
        self, include: object = None, exclude: object = None
    ) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
        return {}, {"image/png": {"alt": self.alt_text()}}


def _figure(width: float = 8, height: float = 3.5) -> tuple[Figure, Axes]:
    # Figure() rather than pyplot: no global state, safe in any backend.
    figure = ReportFigure(figsize=(width, height), layout="constrained")
    return figure, figure.add_subplot()


def trips_per_day(pickups: pd.Series) -> Figure:
    figure, axes = _figure()
    counts = pickups.dt.floor("D").value_counts().sort_index()
    axes.plot(counts.index, counts.to_numpy(), marker="o", markersize=3)
    axes.set(title="Trips per day (by pickup date)", xlabel="pickup date", ylabel="trips")
    figure.autofmt_xdate()
    return figure


def duration_histogram(duration_minutes: pd.Series, upper: float = 120) -> Figure:
    """Durations up to `upper` minutes, with the 1-60 minute training window shaded."""
    figure, axes = _figure()
    shown = duration_minutes[(duration_minutes >= -5) & (duration_minutes <= upper)]
    axes.hist(shown, bins=120, color="#4c72b0")
    axes.axvspan(MIN_DURATION_MINUTES, MAX_DURATION_MINUTES, color="#55a868", alpha=0.15, label="kept: 1-60 min")
    hidden = int(duration_minutes.size - shown.size)
    axes.set(
        title=f"Trip duration ({hidden:,} trips outside -5..{upper:g} min not shown)", xlabel="minutes", ylabel="trips"
    )
    axes.legend()
    return figure


def null_counts_bar(nulls: pd.Series) -> Figure:
    figure, axes = _figure(height=max(2.5, 0.25 * len(nulls)))
    axes.barh(nulls.index.astype(str), nulls.to_numpy(), color="#c44e52")
    axes.invert_yaxis()
    axes.set(title="Nulls per column", xlabel="null values")
    return figure


def top_zones_bar(pickup_zones: pd.DataFrame, dropoff_zones: pd.DataFrame) -> Figure:
    figure = ReportFigure(figsize=(10, 3.5), layout="constrained")
    for axes, zones, title in zip(
        figure.subplots(1, 2), (pickup_zones, dropoff_zones), ("pickup", "dropoff"), strict=True
    ):
        axes.barh(zones["name"], zones["trips"], color="#8172b2")
        axes.invert_yaxis()
        axes.set(title=f"Busiest {title} zones", xlabel="trips", ylabel="zone")
    return figure


def distance_histogram(distance: pd.Series, upper: float = 30) -> Figure:
    figure, axes = _figure()
    axes.hist(distance[(distance >= 0) & (distance <= upper)], bins=100, color="#dd8452")
    axes.set(title=f"Trip distance (0..{upper:g} miles)", xlabel="miles", ylabel="trips")
    return figure


def predicted_vs_actual(actual: np.ndarray, predicted: np.ndarray) -> Figure:
    figure, axes = _figure(6, 5)
    hexes = axes.hexbin(actual, predicted, gridsize=60, bins="log", mincnt=1, cmap="viridis")
    axes.plot([0, MAX_DURATION_MINUTES], [0, MAX_DURATION_MINUTES], color="red", linewidth=1, label="perfect")
    axes.set(title="Predicted vs actual duration (validation)", xlabel="actual minutes", ylabel="predicted minutes")
    axes.legend(loc="upper left")
    figure.colorbar(hexes, ax=axes, label="trips (log)")
    return figure


def residual_histogram(actual: np.ndarray, predicted: np.ndarray) -> Figure:
    figure, axes = _figure()
    axes.hist(np.asarray(predicted) - np.asarray(actual), bins=120, range=(-40, 40), color="#4c72b0")
    axes.axvline(0, color="red", linewidth=1)
    axes.set(title="Residuals (predicted - actual)", xlabel="minutes", ylabel="trips")
    return figure


def filter_breakdown_bar(breakdown: dict[str, float]) -> Figure:
    """Share of the month's trips each duration filter drops, and the share kept."""
    figure, axes = _figure(height=2.8)
    labels = ["kept (1-60 min)", "shorter than 1 min", "longer than 60 min", "no duration"]
    counts = [breakdown["kept"], breakdown["too_short"], breakdown["too_long"], breakdown["unknown_duration"]]
    total = max(breakdown["rows"], 1)
    bars = axes.barh(labels, counts, color=["#55a868", "#c44e52", "#dd8452", "#8c8c8c"])
    axes.bar_label(bars, labels=[f"{count / total:.2%}" for count in counts], padding=3)
    axes.invert_yaxis()
    axes.set(title="What the duration filter keeps and drops", xlabel="trips")
    return figure


def error_by_distance_bar(table: pd.DataFrame) -> Figure:
    figure, axes = _figure()
    labels = [str(interval) for interval in table.index]
    axes.bar(labels, table["rmse"], color="#4c72b0")
    axes.set(title="Validation RMSE by trip distance", xlabel="miles", ylabel="RMSE (minutes)")
    return figure


def feature_importance_bar(table: pd.DataFrame) -> Figure:
    figure, axes = _figure(height=max(2.5, 0.3 * len(table)))
    axes.barh(table["feature"], table["share"], color="#8172b2")
    axes.invert_yaxis()
    axes.set(title="Top features by total gain", xlabel="share of total gain")
    return figure


def profile_comparison_bar(training: dict, scored: dict, feature: str, unit: str) -> Figure:
    """Share of trips per bin of `feature` ("distance" or "duration"): training month beside the scored month."""
    from taxi_duration.modeling.drift import bin_labels

    before, after = training[feature], scored[feature]
    labels = bin_labels(before["edges"])
    positions = np.arange(len(labels))
    figure, axes = _figure()
    axes.bar(positions - 0.2, before["shares"], width=0.4, label=f"{training['month']} (training)", color="#4c72b0")
    axes.bar(positions + 0.2, after["shares"], width=0.4, label=f"{scored['month']} (scored)", color="#dd8452")
    axes.set_xticks(positions, labels, rotation=45, ha="right")
    axes.set(title=f"Trip {feature}: share of trips per bin", xlabel=unit, ylabel="share of trips")
    axes.legend()
    return figure


def optimisation_history(trials: pd.DataFrame) -> Figure:
    """Each trial's hold-out RMSE in trial order (failed trials left out), and the best so far."""
    figure, axes = _figure()
    finished = trials[trials["state"] == "FINISHED"].sort_values("trial")
    axes.scatter(finished["trial"], finished["holdout_rmse"], color="#4c72b0", label="trial")
    axes.step(finished["trial"], finished["holdout_rmse"].cummin(), where="post", color="#dd8452", label="best so far")
    axes.set(title="Optimisation history", xlabel="trial", ylabel="hold-out RMSE (minutes)")
    axes.legend()
    return figure


def parameter_importance_bar(importances: pd.Series) -> Figure:
    """Share of the hold-out RMSE's variation each searched parameter explains (Optuna's fANOVA)."""
    figure, axes = _figure(height=max(2.5, 0.4 * len(importances)))
    axes.barh(importances.index, importances.to_numpy(), color="#8172b2")
    axes.invert_yaxis()
    axes.set(title="Which parameters mattered", xlabel="importance (share)")
    return figure


def best_against_recipe_bar(scores: pd.Series) -> Figure:
    """Hold-out RMSE of the recipe's values and of the best trial."""
    figure, axes = _figure(width=5, height=2.5)
    axes.barh(scores.index, scores.to_numpy(), color=["#4c72b0", "#55a868"][: len(scores)])
    axes.invert_yaxis()
    axes.set(title="Best trial against the recipe", xlabel="hold-out RMSE (minutes)")
    return figure
