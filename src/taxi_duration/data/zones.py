"""TLC's taxi zones: the ids the served model accepts and the names reports print.

`taxi_zone_lookup.csv` is TLC's own lookup table (public data, shipped unchanged as package
data): 265 zones, ids 1 to 265. 264 ("Unknown") and 265 ("Outside of NYC") are ids TLC writes
into its trip files too, so they are valid zones here (about 1 % of real trips use one).
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources

LOOKUP_FILE = "taxi_zone_lookup.csv"
# Words TLC's table uses where a zone has no name or borough.
_NO_NAME = {"", "N/A", "NA", "Unknown"}


@dataclass(frozen=True)
class Zone:
    """One row of TLC's lookup table."""

    zone_id: int
    borough: str
    name: str
    service_zone: str

    def label(self) -> str:
        """'74 East Harlem North (Manhattan)'; '264 Unknown', '265 Outside of NYC' for TLC's catch-alls."""
        name = self.name if self.name not in _NO_NAME else self.borough
        borough = f" ({self.borough})" if self.borough not in _NO_NAME and self.borough != name else ""
        return f"{self.zone_id} {name}{borough}"


@functools.cache
def lookup() -> dict[int, Zone]:
    """Every zone of the shipped lookup table, by id."""
    text = resources.files("taxi_duration.data").joinpath(LOOKUP_FILE).read_text(encoding="utf-8")
    return {
        int(row["LocationID"]): Zone(int(row["LocationID"]), row["Borough"], row["Zone"], row["service_zone"])
        for row in csv.DictReader(text.splitlines())
    }


def zone_ids() -> frozenset[int]:
    """The ids of TLC's zones: the served model refuses any other."""
    return frozenset(lookup())


def id_range() -> str:
    """'1-265': the ids' span, as error messages and reports name it."""
    ids = lookup()
    return f"{min(ids)}-{max(ids)}"


def zone_label(zone_id: object) -> str:
    """'74 East Harlem North (Manhattan)' for zone 74 (an int or its text); 'zone 999' for an id TLC has not."""
    try:
        zone = lookup().get(int(str(zone_id)))
    except ValueError:
        zone = None
    return zone.label() if zone is not None else f"zone {zone_id}"
