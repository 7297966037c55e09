"""Typed errors that every command turns into one line and a non-zero exit."""


class EdgecapError(Exception):
    """Base class for errors caused by user input (bad files, options, models)."""


class ModelError(EdgecapError):
    """A model folder or checkpoint is missing, corrupt or inconsistent."""


class DataError(EdgecapError):
    """A data set, image or source cannot be read."""


class ImageTooLarge(DataError):
    """An image over the pixel budget (`--max-pixels`), refused before it is decoded."""


class ImageWarning(UserWarning):
    """An image that is captioned, but whose caption is unlikely to be good (an extreme aspect ratio)."""
