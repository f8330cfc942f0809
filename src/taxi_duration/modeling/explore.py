"""Profile of one month of trips: what the exploration notebook shows before any modelling."""

from __future__ import annotations

import pandas as pd

from taxi_duration.data import zones
from taxi_duration.data.tripfiles import normalize_trips
from taxi_duration.modeling.features import MAX_DURATION_MINUTES, MIN_DURATION_MINUTES, trip_duration_minutes


def null_counts(frame: pd.DataFrame) -> pd.Series:
    """Nulls per column, most first."""
    return frame.isna().sum().sort_values(ascending=False)


def duration_filter_breakdown(duration: pd.Series) -> dict[str, float]:
    """How many trips each side of the 1-60 minute window drops, as counts and shares."""
    total = int(duration.size)
    too_short = int((duration < MIN_DURATION_MINUTES).sum())
    too_long = int((duration > MAX_DURATION_MINUTES).sum())
    unknown = int(duration.isna().sum())
    kept = total - too_short - too_long - unknown
    share = (lambda n: n / total) if total else (lambda n: 0.0)
    return {
        "rows": total,
        "kept": kept,
        "too_short": too_short,
        "too_long": too_long,
        "unknown_duration": unknown,
        "dropped_share": share(total - kept),
        "too_short_share": share(too_short),
        "too_long_share": share(too_long),
    }


def busiest_zones(frame: pd.DataFrame, column: str, top: int = 10) -> pd.DataFrame:
    """The `top` zones by trip count for a location column: id, name (TLC's lookup), trips, share of trips."""
    counts = frame[column].value_counts().head(top)
    return pd.DataFrame(
        {
            "zone": counts.index.astype(str),
            "name": [zones.zone_label(zone) for zone in counts.index],
            "trips": counts.to_numpy(),
            "share": counts.to_numpy() / len(frame),
        }
    )


DURATION_QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def duration_quantiles(duration: pd.Series) -> dict[str, float]:
    """Trip duration (minutes) at each of DURATION_QUANTILES, keyed 'p01' ... 'p99'."""
    values = duration.dropna()
    return {
        f"p{round(q * 100):02d}": float(values.quantile(q)) if len(values) else float("nan") for q in DURATION_QUANTILES
    }


def zone_counts(zones: pd.DataFrame) -> list[dict[str, object]]:
    """`busiest_zones` rows as JSON-ready records, for the stage's manifest."""
    columns = zip(zones["zone"], zones["trips"], zones["share"], strict=True)
    return [{"zone": str(zone), "trips": int(trips), "share": float(share)} for zone, trips, share in columns]


def profile_month(frame: pd.DataFrame, color: str) -> dict[str, object]:
    """Headline figures of a month's raw trips (before any filtering)."""
    trips = normalize_trips(frame, color)
    duration = trip_duration_minutes(trips, color)
    breakdown = duration_filter_breakdown(duration)
    return {
        "rows": len(trips),
        "columns": len(trips.columns),
        "duration_median_minutes": float(duration.median()) if len(duration) else float("nan"),
        "duration_p99_minutes": float(duration.quantile(0.99)) if len(duration) else float("nan"),
        "rows_kept_by_filter": breakdown["kept"],
        "share_dropped_by_filter": breakdown["dropped_share"],
        "distinct_pickup_zones": int(trips["PULocationID"].nunique()),
        "distinct_dropoff_zones": int(trips["DOLocationID"].nunique()),
    }
