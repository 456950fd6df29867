"""Exception and warning types raised by dflashdeconv.

Every problem with user input raises :class:`InputError` (a ``ValueError``) with a
message that names the offending object, before any long computation starts.
"""


class DFlashDeconvError(Exception):
    """Base class of the errors raised by dflashdeconv itself."""


class InputError(DFlashDeconvError, ValueError):
    """Invalid user input: shapes, values, labels, coordinates or files."""


class NotFittedError(DFlashDeconvError, RuntimeError):
    """A fitted attribute was requested before ``fit`` ran."""


class DataWarning(UserWarning):
    """Suspicious but usable input (unlabelled cells, spots without counts, ...)."""
