"""Typed errors that every command turns into one line and a non-zero exit."""


class EdgecapError(Exception):
    """Base class for errors caused by user input (bad files, options, models)."""


class ModelError(EdgecapError):
    """A model folder or checkpoint is missing, corrupt or inconsistent."""


class DataError(EdgecapError):
    """A data set, image or source cannot be read."""
