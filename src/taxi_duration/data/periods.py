"""Pipeline parameters: which month of which taxi colour, and whether TLC publishes it."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Literal, cast

from pydantic import Field

COLORS = ("green", "yellow")
# The flows' parameter types, so Prefect's deployment form offers a dropdown and bounded
# numbers, and its server rejects a bad value before a run is created (periods still checks
# everything, with its own messages, for the command lines and direct calls).
Color = Literal["green", "yellow"]
Year = Annotated[int, Field(ge=2009, le=2100)]  # yellow records start in 2009 (FIRST_PUBLISHED)
MonthNumber = Annotated[int, Field(ge=1, le=12)]

# First month TLC published for each colour (yellow records start in 2009; green, the
# street-hail livery, in August 2013).
FIRST_PUBLISHED = {"yellow": (2009, 1), "green": (2013, 8)}


class InvalidParameterError(ValueError):
    """A pipeline parameter that cannot be right; raised before anything is downloaded."""


@dataclass(frozen=True, order=True)
class Month:
    year: int
    month: int

    def __post_init__(self) -> None:
        if not 1 <= self.month <= 12:
            raise InvalidParameterError(f"month must be between 1 and 12, got {self.month}")

    def next(self) -> Month:
        """The following month; December rolls over to January of the next year."""
        if self.month == 12:
            return Month(self.year + 1, 1)
        return Month(self.year, self.month + 1)

    def previous(self) -> Month:
        """The month before; January rolls back to December of the year before."""
        if self.month == 1:
            return Month(self.year - 1, 12)
        return Month(self.year, self.month - 1)

    def label(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    def __str__(self) -> str:
        return self.label()


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise InvalidParameterError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidParameterError(f"{name} must be a whole number, got {value!r}")
    return int(text)


@dataclass(frozen=True)
class PipelineParams:
    """Validated year, month and colour of one pipeline run (train month; validation is the next)."""

    year: int
    month: int
    color: Color = "green"

    @classmethod
    def parse(
        cls, year: object, month: object, color: object = "green", today: dt.date | None = None
    ) -> PipelineParams:
        """Validate raw values (CLI strings or UI input) and name what is wrong."""
        year_int = _as_int("year", year)
        month_int = _as_int("month", month)
        if not 1 <= month_int <= 12:
            raise InvalidParameterError(f"month must be between 1 and 12, got {month_int}")
        color_text = str(color).strip().lower()
        if color_text not in COLORS:
            raise InvalidParameterError(f"color must be one of {', '.join(COLORS)}, got {color!r}")
        params = cls(year_int, month_int, cast("Color", color_text))  # one of COLORS, checked above
        params._check_published(today or dt.date.today())
        return params

    def _check_published(self, today: dt.date) -> None:
        first = Month(*FIRST_PUBLISHED[self.color])
        if self.train_month < first:
            raise InvalidParameterError(
                f"TLC publishes {self.color} taxi trips from {first} on; {self.train_month} has no data"
            )
        # The validation month must have ended before its file can exist.
        current = Month(today.year, today.month)
        if self.validation_month >= current:
            raise InvalidParameterError(
                f"{self.train_month} needs the following month ({self.validation_month}) as validation data, "
                f"and that month has not ended yet (today is {today.isoformat()})"
            )

    @property
    def train_month(self) -> Month:
        return Month(self.year, self.month)

    @property
    def validation_month(self) -> Month:
        return self.train_month.next()


def scoring_month(year: object, month: object, color: object = "green") -> tuple[Month, str]:
    """The month to score and its colour, validated; unlike training it needs no month after it."""
    year_int, month_int = _as_int("year", year), _as_int("month", month)
    if not 1 <= month_int <= 12:
        raise InvalidParameterError(f"month must be between 1 and 12, got {month_int}")
    color_text = str(color).strip().lower()
    if color_text not in COLORS:
        raise InvalidParameterError(f"color must be one of {', '.join(COLORS)}, got {color!r}")
    first = Month(*FIRST_PUBLISHED[color_text])
    if Month(year_int, month_int) < first:
        raise InvalidParameterError(
            f"TLC publishes {color_text} taxi trips from {first} on; {Month(year_int, month_int)} has no data"
        )
    return Month(year_int, month_int), color_text


MAX_BACKFILL_MONTHS = 240


def parse_month(text: str) -> Month:
    """'2023-04' -> Month(2023, 4), naming the expected format when it is not that."""
    parts = str(text).strip().split("-")
    if len(parts) != 2 or not all(part.isascii() and part.isdigit() for part in parts):
        raise InvalidParameterError(f"months are written YYYY-MM, got {text!r}")
    return Month(int(parts[0]), int(parts[1]))


def month_range(first: str, last: str) -> list[Month]:
    """Every month from `first` to `last` inclusive (YYYY-MM)."""
    start, end = parse_month(first), parse_month(last)
    if end < start:
        raise InvalidParameterError(f"--to {end} is before --from {start}")
    months = [start]
    while months[-1] < end:
        months.append(months[-1].next())
        if len(months) > MAX_BACKFILL_MONTHS:
            raise InvalidParameterError(f"{start}..{end} spans more than {MAX_BACKFILL_MONTHS} months")
    return months
