"""TLC trip data: where files come from, their download and validation, months, zones, synthetic months."""
