"""The one exception type for errors a user can cause and fix (a bad file, flag or config value,
missing weights). launch.py catches it once and prints one line, `error: ...`, without a
traceback; everything else is a bug and keeps its traceback.

It subclasses ValueError so that code (and tests) that expect a ValueError for bad values still
see one.
"""


class UserError(ValueError):
    """What was expected, what was found, and which file or field."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (or that a mode needs) is not there."""
