"""User-facing errors.

Every problem a user can cause (a bad config key, a malformed annotation file, a missing checkpoint,
a wrong request) raises one of these, with a message that names the file, field or value and says
what would be accepted. The CLI prints the message on one line and exits with status 2; library code
never calls ``sys.exit``.
"""

from __future__ import annotations


class DetrError(Exception):
    """Base class for errors caused by user input rather than by a bug in this package."""

    #: the CLI's exit status for this error (2: bad input or usage)
    exit_code = 2


class ConfigError(DetrError):
    """A config file, key path or override value is invalid."""


class DatasetFormatError(DetrError):
    """An annotation file, image or dataset directory cannot be read as the declared format."""


class CheckpointError(DetrError):
    """A checkpoint is missing, unreadable, of an unknown format, or does not fit the model."""


class InvalidInputError(DetrError):
    """A request or function argument is malformed (serving, prediction, CLI arguments)."""
