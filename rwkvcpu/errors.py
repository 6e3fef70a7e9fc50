"""Exception types raised at the edges of rwkvcpu.

Every error a user can cause by handing us a bad file, flag or token derives
from :class:`RwkvCpuError`; the CLI turns any of them into one line on stderr
and exit code 2. Messages name the file, tensor and shape involved and say
what to do instead.
"""

import errno


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


class ExtraNotInstalledError(RwkvCpuError, ImportError):
    """An optional capability is used without its extra installed; the message says what to pip install."""


class StateFileError(RwkvCpuError, OSError):
    """A state file cannot be written: no such directory, a directory, permission denied, disk full.

    Also an OSError, as the failures it stands for are."""


def os_reason(e: OSError) -> str:
    """The cause of a failed file operation, in words a user acts on."""
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "no space left on the device"
    if e.errno == errno.EISDIR:
        return "is a directory"
    if e.errno == errno.EROFS:
        return "read-only file system"
    return (e.strerror or str(e)).lower()


def open_input(path, what: str, error: type, mode: str = "rb", **kwargs):
    """open(path, mode) for reading a file the user named; one-line `error`s saying what is wrong.

    Args:
        path: the file.
        what: what the file should be, for the messages ("file", "state file", "text file").
        error: the RwkvCpuError subclass to raise.

    Example:
        >>> open_input("nope.txt", "text file", InvalidArgumentError, "r", encoding="utf-8")
        InvalidArgumentError: nope.txt: no such text file
    """
    try:
        return open(path, mode, **kwargs)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({os_reason(e)})") from None
