"""PipelineParams.parse and Month: every wrong value is rejected before anything is downloaded."""

from __future__ import annotations

import datetime as dt

import pytest

from taxi_duration.data.periods import FIRST_PUBLISHED, InvalidParameterError, Month, PipelineParams

TODAY = dt.date(2024, 6, 15)


def parse(year, month, color="green", today=TODAY):
    return PipelineParams.parse(year, month, color, today=today)


# --- Month -------------------------------------------------------------------------


def test_month_next_within_year():
    assert Month(2024, 3).next() == Month(2024, 4)


def test_december_rolls_over_to_january_of_next_year():
    assert Month(2023, 12).next() == Month(2024, 1)


def test_month_label_is_zero_padded():
    assert Month(2024, 3).label() == "2024-03"
    assert str(Month(2024, 11)) == "2024-11"


def test_months_order_by_year_then_month():
    assert Month(2023, 12) < Month(2024, 1) < Month(2024, 2)
    assert sorted([Month(2024, 2), Month(2023, 12), Month(2024, 1)]) == [
        Month(2023, 12),
        Month(2024, 1),
        Month(2024, 2),
    ]


@pytest.mark.parametrize("month", [0, 13, -1])
def test_month_outside_1_to_12_is_rejected(month):
    with pytest.raises(InvalidParameterError, match=f"month must be between 1 and 12, got {month}"):
        Month(2024, month)


# --- PipelineParams.parse: accepted values ------------------------------------------


def test_parse_accepts_ints_and_gives_train_and_validation_months():
    params = parse(2024, 3, "green")
    assert params == PipelineParams(2024, 3, "green")
    assert params.train_month == Month(2024, 3)
    assert params.validation_month == Month(2024, 4)


def test_parse_accepts_cli_strings_with_whitespace_and_normalizes_colour():
    params = parse(" 2024 ", "03", " Yellow ")
    assert (params.year, params.month, params.color) == (2024, 3, "yellow")
    assert isinstance(params.year, int) and isinstance(params.month, int)


def test_parse_default_colour_is_green():
    assert PipelineParams.parse(2024, 3, today=TODAY).color == "green"


def test_december_train_month_validates_on_january_of_next_year():
    params = parse(2023, 12, today=dt.date(2024, 2, 1))
    assert params.validation_month == Month(2024, 1)


# --- PipelineParams.parse: rejected values ------------------------------------------


@pytest.mark.parametrize("month", [13, 0, "13", "0"])
def test_parse_rejects_month_outside_1_to_12(month):
    with pytest.raises(InvalidParameterError, match="month must be between 1 and 12"):
        parse(2024, month)


@pytest.mark.parametrize("year", ["20x4", "", "2024.0", "-2024", 2024.0, None])
def test_parse_rejects_year_that_is_not_a_whole_number(year):
    with pytest.raises(InvalidParameterError, match=r"year must be a whole number, got"):
        parse(year, 3)


def test_year_error_quotes_the_bad_value():
    with pytest.raises(InvalidParameterError) as info:
        parse("20x4", 3)
    assert "'20x4'" in str(info.value)


@pytest.mark.parametrize("month", ["three", "3.5", True])
def test_parse_rejects_month_that_is_not_a_whole_number(month):
    with pytest.raises(InvalidParameterError, match="month must be a whole number"):
        parse(2024, month)


def test_parse_rejects_bool_year():
    # bool is an int subclass; True must not silently become year 1.
    with pytest.raises(InvalidParameterError, match="year must be a whole number"):
        parse(True, 3)


@pytest.mark.parametrize("color", ["purple", "", None, "greenish"])
def test_parse_rejects_unknown_colour_and_lists_the_valid_ones(color):
    with pytest.raises(InvalidParameterError) as info:
        parse(2024, 3, color)
    message = str(info.value)
    assert "color must be one of green, yellow" in message
    assert repr(color) in message


@pytest.mark.parametrize(
    ("color", "too_early", "first"),
    [("green", (2013, 7), (2013, 8)), ("yellow", (2008, 12), (2009, 1))],
)
def test_month_before_the_colours_first_tlc_file_is_rejected(color, too_early, first):
    assert FIRST_PUBLISHED[color] == first
    with pytest.raises(InvalidParameterError) as info:
        parse(*too_early, color)
    message = str(info.value)
    assert f"TLC publishes {color} taxi trips from {Month(*first)} on" in message
    assert f"{Month(*too_early)} has no data" in message


@pytest.mark.parametrize(("color", "first"), [("green", (2013, 8)), ("yellow", (2009, 1))])
def test_colours_first_published_month_is_accepted(color, first):
    assert parse(*first, color).train_month == Month(*first)


def test_train_month_whose_following_month_has_not_ended_is_rejected():
    # Today is 2024-06-15: May 2024 needs June 2024, which is still running.
    with pytest.raises(InvalidParameterError) as info:
        parse(2024, 5)
    message = str(info.value)
    assert "2024-05 needs the following month (2024-06)" in message
    assert "has not ended yet" in message
    assert "2024-06-15" in message


def test_current_and_future_train_months_are_rejected():
    for year, month in [(2024, 6), (2024, 7), (2030, 1)]:
        with pytest.raises(InvalidParameterError, match="has not ended yet"):
            parse(year, month)


def test_train_month_whose_following_month_has_ended_is_accepted():
    # Today is 2024-06-15: April 2024 validates on May 2024, which has ended.
    assert parse(2024, 4).validation_month == Month(2024, 5)


def test_first_day_of_a_month_counts_the_previous_month_as_ended():
    assert parse(2024, 4, today=dt.date(2024, 6, 1)).validation_month == Month(2024, 5)
    with pytest.raises(InvalidParameterError, match="has not ended yet"):
        parse(2024, 5, today=dt.date(2024, 6, 30))


def test_december_is_rejected_while_january_of_next_year_is_running():
    with pytest.raises(InvalidParameterError, match=r"2023-12 needs the following month \(2024-01\)"):
        parse(2023, 12, today=dt.date(2024, 1, 31))


def test_superscript_digit_year_is_an_invalid_parameter_error():
    with pytest.raises(InvalidParameterError, match="year must be a whole number"):
        parse("2024²", 3)
