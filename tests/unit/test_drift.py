"""Trip profiles and the drift figures 04_score shows: bins, PSI, verdicts, the table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from taxi_duration.modeling import drift


def profile(month: str, distance, duration=None) -> dict:
    return drift.trip_profile(month, distance, duration)


def gamma_trips(seed: int, rows: int = 4000, scale: float = 1.8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    distance = rng.gamma(1.6, scale, rows)
    duration = np.clip(2 + distance * 3 + rng.normal(0, 2, rows), 1, 60)
    return distance, duration


# --- trip_profile -------------------------------------------------------------------------


def test_profile_shares_sum_to_one_over_the_fixed_bins():
    distance, duration = gamma_trips(seed=1)

    result = profile("2023-02", distance, duration)

    assert result["month"] == "2023-02" and result["trips"] == len(distance)
    assert result["distance"]["edges"] == list(drift.DISTANCE_EDGES)
    assert result["duration"]["edges"] == list(drift.DURATION_EDGES)
    assert len(result["distance"]["shares"]) == len(drift.DISTANCE_EDGES) + 1
    assert len(result["duration"]["shares"]) == len(drift.DURATION_EDGES) + 1
    assert sum(result["distance"]["shares"]) == pytest.approx(1.0, abs=1e-5)
    assert sum(result["duration"]["shares"]) == pytest.approx(1.0, abs=1e-5)
    assert result["distance"]["mean"] == pytest.approx(distance.mean(), abs=1e-4)
    assert result["distance"]["median"] == pytest.approx(np.median(distance), abs=1e-4)
    assert result["duration"]["p95"] == pytest.approx(np.quantile(duration, 0.95), abs=1e-4)


def test_bins_follow_the_distance_edges():
    # Below the first edge; exactly on an edge goes to the bin above it; above the last edge.
    distance = [0.1, 0.49, 0.5, 0.99, 1.0, 4.5, 20.0, 35.0]

    shares = profile("2023-02", distance)["distance"]["shares"]

    counts = [round(share * len(distance)) for share in shares]
    #         <0.5 0.5-1 1-1.5 1.5-2 2-3 3-4 4-5 5-7 7-10 10-15 15-20 >=20
    assert counts == [2, 2, 1, 0, 0, 0, 1, 0, 0, 0, 0, 2]
    assert len(counts) == len(drift.bin_labels(list(drift.DISTANCE_EDGES)))


def test_profile_leaves_out_missing_distances_but_counts_the_trips():
    result = profile("2023-02", [1.2, np.nan, 1.4, np.inf])

    assert result["trips"] == 4
    assert result["distance"]["shares"][2] == 1.0  # both finite ones in 1-1.5
    assert result["distance"]["mean"] == pytest.approx(1.3)


def test_profile_without_durations():
    assert profile("2023-05", [1.0, 2.0])["duration"] is None
    assert profile("2023-05", [1.0, 2.0], duration=[])["duration"] is None
    assert profile("2023-05", [np.nan])["distance"] is None


def test_profile_is_plain_json():
    import json

    distance, duration = gamma_trips(seed=2, rows=50)
    result = profile("2023-02", distance, duration)
    assert json.loads(json.dumps(result)) == result


# --- PSI and its verdict -------------------------------------------------------------------


def test_psi_is_zero_for_identical_distributions():
    shares = profile("a", gamma_trips(seed=3)[0])["distance"]["shares"]
    assert drift.population_stability_index(shares, shares) == 0.0


def test_psi_on_known_numbers():
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5)
    expected = 0.25 * math.log(2) + 0.25 * math.log(1.5)
    assert drift.population_stability_index([0.5, 0.5], [0.25, 0.75]) == pytest.approx(expected)


def test_psi_grows_with_the_shift():
    base = profile("a", gamma_trips(seed=4)[0])["distance"]["shares"]
    psis = [
        drift.population_stability_index(base, profile("b", gamma_trips(seed=5, scale=scale)[0])["distance"]["shares"])
        for scale in (1.8, 2.5, 4.0, 8.0)
    ]
    assert psis == sorted(psis) and len(set(psis)) == len(psis)
    assert psis[0] < drift.PSI_MODERATE  # another sample of the same distribution
    assert psis[-1] > drift.PSI_LARGE


def test_psi_is_finite_when_a_bin_is_empty_on_one_side():
    psi = drift.population_stability_index([1.0, 0.0], [0.5, 0.5])
    assert math.isfinite(psi) and psi > drift.PSI_LARGE


def test_psi_refuses_distributions_with_different_bins():
    with pytest.raises(ValueError, match="3 and 2 bins"):
        drift.population_stability_index([0.2, 0.3, 0.5], [0.5, 0.5])


@pytest.mark.parametrize(
    ("psi", "label"),
    [
        (0.0, "stable"),
        (0.0999, "stable"),
        (0.1, "moderate shift"),
        (0.2499, "moderate shift"),
        (0.25, "large shift"),
        (3.0, "large shift"),
    ],
)
def test_shift_label_thresholds(psi, label):
    assert drift.shift_label(psi) == label


# --- unseen pairs ---------------------------------------------------------------------------


def test_unseen_pair_share():
    pairs = pd.Series(["1_2", "3_4", "1_2", "5_6"])
    assert drift.unseen_pair_share(pairs, {"1_2"}) == 0.5
    assert drift.unseen_pair_share(pairs, {"1_2", "3_4", "5_6"}) == 0.0
    assert drift.unseen_pair_share(pairs, set()) == 1.0
    assert drift.unseen_pair_share(pd.Series([], dtype=object), {"1_2"}) == 0.0


# --- figures and table ---------------------------------------------------------------------


@pytest.fixture
def months() -> tuple[dict, dict]:
    training = profile("2023-02", *gamma_trips(seed=6, rows=4000))
    scored = profile("2023-05", *gamma_trips(seed=7, rows=2000, scale=4.0))
    return training, scored


def test_drift_figures(months):
    training, scored = months

    figures = drift.drift_figures(training, scored, 0.125)

    assert figures["training_trips"] == 4000.0 and figures["month_trips"] == 2000.0
    assert figures["trip_count_ratio"] == 0.5
    assert figures["unseen_pu_do_share"] == 0.125
    for feature in ("distance", "duration"):
        assert figures[f"{feature}_psi"] == drift.population_stability_index(
            training[feature]["shares"], scored[feature]["shares"]
        )
        assert figures[f"{feature}_mean_training"] == training[feature]["mean"]
        assert figures[f"{feature}_mean_scored"] == scored[feature]["mean"]
    assert figures["distance_psi"] > drift.PSI_LARGE
    assert all(isinstance(value, float) for value in figures.values())


def test_drift_figures_without_scored_durations_have_no_duration_figures(months):
    training, _ = months
    scored = profile("2023-05", gamma_trips(seed=8)[0])

    figures = drift.drift_figures(training, scored, 0.0)

    assert "distance_psi" in figures
    assert not [key for key in figures if key.startswith("duration")]


def test_drift_figures_of_an_empty_training_month():
    figures = drift.drift_figures(profile("2023-02", []), profile("2023-05", [1.0]), 0.0)
    assert math.isnan(figures["trip_count_ratio"])
    assert "distance_psi" not in figures


def test_drift_table(months):
    training, scored = months

    table = drift.drift_table(training, scored, 0.12345)

    assert list(table.columns) == ["figure", "2023-02 (training)", "2023-05 (scored)", "note"]
    rows = table.set_index("figure")
    assert list(rows.index) == [
        "trips (1-60 min)",
        "distance mean (mi)",
        "distance median (mi)",
        "distance p95 (mi)",
        "distance PSI",
        "duration mean (min)",
        "duration median (min)",
        "duration p95 (min)",
        "duration PSI",
        "PU_DO pairs unseen in training (share of trips)",
    ]
    assert rows.loc["trips (1-60 min)"].tolist() == [4000, 2000, "0.50x"]
    assert rows.loc["distance mean (mi)"].tolist() == [training["distance"]["mean"], scored["distance"]["mean"], ""]
    assert rows.loc["duration p95 (min)"].tolist() == [training["duration"]["p95"], scored["duration"]["p95"], ""]
    distance_psi = drift.population_stability_index(training["distance"]["shares"], scored["distance"]["shares"])
    assert rows.loc["distance PSI"].tolist() == ["", round(distance_psi, 4), drift.shift_label(distance_psi)]
    assert rows.loc["distance PSI", "note"] == "large shift"
    assert rows.loc["PU_DO pairs unseen in training (share of trips)"].tolist() == [0.0, 0.1235, ""]


def test_drift_table_without_scored_durations_says_unavailable(months):
    training, _ = months
    scored = profile("2023-05", gamma_trips(seed=9)[0])  # dropoffs not published: no durations

    table = drift.drift_table(training, scored, 0.0).set_index("figure")

    assert "trips" in table.index and "trips (1-60 min)" not in table.index
    assert "distance PSI" in table.index
    assert not [figure for figure in table.index if figure.startswith("duration ")]
    assert table.loc["duration", "note"].startswith("unavailable")
    assert table.loc["duration", "2023-05 (scored)"] == ""


def test_drift_table_with_a_training_profile_without_durations_says_unavailable(months):
    _, scored = months
    training = profile("2023-02", gamma_trips(seed=10)[0])

    table = drift.drift_table(training, scored, 0.0).set_index("figure")

    assert table.loc["duration", "note"].startswith("unavailable")
    assert not [figure for figure in table.index if figure.startswith("duration ")]


def test_bin_labels():
    assert drift.bin_labels([0.5, 1.0, 1.5]) == ["<0.5", "0.5-1", "1-1.5", ">=1.5"]
    labels = drift.bin_labels(list(drift.DISTANCE_EDGES))
    assert labels[0] == "<0.5" and labels[-1] == ">=20" and "10-15" in labels
    assert len(labels) == len(drift.DISTANCE_EDGES) + 1
    assert drift.bin_labels(list(drift.DURATION_EDGES)) == [
        "<5",
        "5-10",
        "10-15",
        "15-20",
        "20-25",
        "25-30",
        "30-40",
        "40-50",
        ">=50",
    ]
