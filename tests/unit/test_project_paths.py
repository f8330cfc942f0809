"""Relative paths a user gives mean the project root, whatever the working directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from taxi_duration import settings
from taxi_duration.data import tripfiles
from taxi_duration.data.periods import Month
from taxi_duration.data.synthetic import write_trip_file
from taxi_duration.orchestration import schedule

PROJECT_DIR = Path(__file__).resolve().parents[2]
KNOBS = ("TAXI_DATA_SOURCE", "TAXI_DATA_DIR", "TAXI_OUTPUTS_DIR", "TAXI_CACHE_DIR")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root, and a working directory elsewhere (as a kernel in notebooks/ or papermill in /tmp has)."""
    root = tmp_path / "project"
    (root / "notebooks").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("TAXI_PROJECT_DIR", str(root))
    monkeypatch.chdir(elsewhere)
    for knob in KNOBS:
        monkeypatch.delenv(knob, raising=False)
    return root


def test_relative_knobs_mean_the_project_root(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAXI_DATA_DIR", "cache/trips")
    monkeypatch.setenv("TAXI_OUTPUTS_DIR", "../runs")
    monkeypatch.setenv("TAXI_CACHE_DIR", "stage-cache")
    assert settings.data_dir() == project / "cache" / "trips"
    assert settings.outputs_dir() == project.parent / "runs"
    assert settings.stage_cache_dir() == project / "stage-cache"


def test_defaults_and_absolute_paths_are_unchanged(
    project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert settings.data_dir() == project / "data"
    assert settings.outputs_dir() == project / "outputs"
    assert settings.stage_cache_dir() == project / "outputs" / ".stage-cache"
    monkeypatch.setenv("TAXI_OUTPUTS_DIR", str(tmp_path / "absolute"))
    assert settings.outputs_dir() == tmp_path / "absolute"
    assert settings.project_path("~/x") == Path.home() / "x"


def test_a_relative_data_source_is_found_from_any_working_directory(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_trip_file(project / "tlc", "green", Month(2023, 3), 50, seed=1)
    monkeypatch.setenv("TAXI_DATA_SOURCE", "tlc")
    source = tripfiles.trip_source()
    assert source.location == str(project / "tlc")
    assert source.cache_dir == project / "data"
    tripfiles.check_source_location("tlc")  # a folder under the project root, not under the working directory
    assert schedule.is_published("tlc", "green", Month(2023, 3))
    assert tripfiles.trip_source("tlc", "cache").cache_dir == project / "cache"


def test_a_missing_relative_source_is_named(project: Path) -> None:
    with pytest.raises(tripfiles.TripDataError, match="no-such-folder"):
        tripfiles.check_source_location("no-such-folder")


def test_urls_are_left_alone(project: Path) -> None:
    assert tripfiles.trip_source("https://example.org/trip-data").location == "https://example.org/trip-data"


def test_make_help_shows_values_not_variable_names() -> None:
    shown = subprocess.run(
        ["make", "--no-print-directory", "help", "MODEL_PORT=5077"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "127.0.0.1:5077" in shown
    assert "$(" not in shown
