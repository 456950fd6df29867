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


class Terminated(BaseException):
    """The run was told to stop (SIGTERM: a batch system stopping the job); what it recorded
    is kept for ``--resume``. A BaseException, like KeyboardInterrupt, so that libraries'
    ``except Exception`` blocks (distributed's task serialisation among them) neither swallow
    it nor wrap it in another error."""


class DataWarning(UserWarning):
    """Suspicious but usable input (unlabelled cells, spots without counts, ...)."""
