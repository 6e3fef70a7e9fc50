"""Exception types raised at the edges of rwkvcpu.

Every error a user can cause by handing us a bad file, flag or token derives
from :class:`RwkvCpuError`; the CLI turns any of them into one line on stderr
and exit code 2. Messages name the file, tensor and shape involved and say
what to do instead.
"""


class RwkvCpuError(Exception):
    """Base class of every error rwkvcpu raises on bad input."""


class ModelFormatError(RwkvCpuError, ValueError):
    """A checkpoint is truncated, foreign, misshapen or otherwise unreadable."""


class UnsafePickleError(ModelFormatError):
    """A .pth pickle asked for a global outside the state-dict allow-list."""


class UnsupportedModelError(ModelFormatError):
    """A readable checkpoint of an architecture rwkvcpu does not run."""


class ConversionError(RwkvCpuError):
    """Conversion could not complete (bad destination, full disk, ...)."""


class StateMismatchError(RwkvCpuError, ValueError):
    """A saved state does not belong to the model it is loaded into."""


class InvalidArgumentError(RwkvCpuError, ValueError):
    """A sampling option, prompt or token id given by the caller is out of range."""


class StateFileError(RwkvCpuError, OSError):
    """A state file cannot be written: no such directory, a directory, permission denied, disk full.

    Also an OSError, as the failures it stands for are."""
