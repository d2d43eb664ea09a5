"""Errors for bad input data. Every message names the file or manifest row at fault."""

from __future__ import annotations


class DataError(ValueError):
    """A file, folder or manifest row cannot be used; the message says which and why."""


class MissingFileError(DataError, FileNotFoundError):
    """A file or folder named by the user or a manifest does not exist."""
