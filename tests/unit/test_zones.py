"""TLC's zone lookup table, shipped with the package: valid zone ids and the names reports print."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from taxi_duration.data import zones

SHIPPED = Path(zones.__file__).with_name(zones.LOOKUP_FILE)


def test_the_lookup_has_tlc_s_265_zones() -> None:
    assert zones.zone_ids() == frozenset(range(1, 266))
    assert zones.id_range() == "1-265"
    assert zones.lookup()[132] == zones.Zone(132, "Queens", "JFK Airport", "Airports")


@pytest.mark.parametrize(
    ("zone_id", "label"),
    [
        (74, "74 East Harlem North (Manhattan)"),
        ("74", "74 East Harlem North (Manhattan)"),  # as manifests keep them
        (1, "1 Newark Airport (EWR)"),
        (264, "264 Unknown"),  # TLC's own catch-alls: no borough to add
        (265, "265 Outside of NYC"),
        (999, "zone 999"),
        ("x", "zone x"),
    ],
)
def test_zone_labels(zone_id: object, label: str) -> None:
    assert zones.zone_label(zone_id) == label


def test_the_shipped_table_is_tlc_s_unchanged(real_tlc_dir: Path) -> None:
    original = real_tlc_dir / zones.LOOKUP_FILE
    if not original.is_file():
        pytest.skip(f"TLC's lookup table not present: {original}")
    assert hashlib.sha256(SHIPPED.read_bytes()).hexdigest() == hashlib.sha256(original.read_bytes()).hexdigest()


def test_pyproject_ships_the_table_as_package_data() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert zones.LOOKUP_FILE in pyproject["tool"]["setuptools"]["package-data"]["taxi_duration.data"]
