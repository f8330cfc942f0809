"""NYC taxi trip-duration pipeline: the logic the notebooks and flows call."""

__version__ = "0.1.0"
