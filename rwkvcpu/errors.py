"""Exception types raised at the edges of rwkvcpu.

Every error a user can cause by handing us a bad file, flag or token derives
from :class:`RwkvCpuError`; the CLI turns any of them into one line on stderr
and exit code 2. Messages name the file, tensor and shape involved and say
what to do instead.
"""

import errno
import os
import reprlib
import stat

try:
    import fcntl
except ImportError:  # Windows: no named pipes to wait on at open, and no O_NONBLOCK to clear
    fcntl = None


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

    def __init__(self, message: str, field: str = None):
        super().__init__(message)
        # The words naming the bad value in the message ("top_p", "banned token id", ...), or
        # None: a front end with names of its own (the CLI's flags) rewords the message by them.
        self.field = field


class ExtraNotInstalledError(RwkvCpuError, ImportError):
    """An optional capability is used without its extra installed; the message says what to pip install."""


class NonFiniteError(RwkvCpuError, ArithmeticError):
    """The model computed NaN or infinite logits (its weights or the state overflowed)."""


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


# What a file that is not a regular file is, for messages; anything else is "a special file".
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, in words ("a regular file", "a named pipe (FIFO)", ...)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((kind for test, kind in _KINDS if test(mode)), "a special file")


def open_input(path, what: str, error: type, mode: str = "rb", *, pipe_ok: bool = False, **kwargs):
    """open(path, mode) for reading a file the user named; one-line `error`s saying what is wrong.

    Only a regular file is opened (also behind a symbolic link): a named pipe
    with no writer, a device such as /dev/zero or a socket would block the
    read forever or never end, so they are refused before a byte is read.
    The check is made on the opened descriptor (opened without blocking),
    not on the name, so the file cannot be swapped in between.

    Args:
        path: the file.
        what: what the file should be, for the messages ("file", "state file", "text file").
        error: the RwkvCpuError subclass to raise.
        mode: "rb" or "r" (then kwargs go to the text wrapper, e.g. encoding).
        pipe_ok: also accept a pipe (a shell's `<(zcat book.gz)`): read to its end,
            which comes at once when nothing writes to it.

    Example:
        >>> open_input("nope.txt", "text file", InvalidArgumentError, "r", encoding="utf-8")
        InvalidArgumentError: nope.txt: no such text file
        >>> open_input("/dev/zero", "file", ModelFormatError)
        ModelFormatError: /dev/zero: is a character device, not a regular file; give the file itself
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({os_reason(e)})") from None
    try:
        st_mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(st_mode):
            raise error(f"{path}: is a directory, not a {what}")
        if not (stat.S_ISREG(st_mode) or (pipe_ok and stat.S_ISFIFO(st_mode))):
            raise error(f"{path}: is {file_kind(st_mode)}, not a regular file; give the {what} itself")
        # Reads block again from here on (a pipe's writer may still be coming).
        if fcntl is not None:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlevel = 2


def shown(value) -> str:
    """repr() of a value read from a file, cut to a short line: safe in a one-line message
    however large, deep or strange the value is.

    Example:
        >>> shown("x" * 1000)
        "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'"
    """
    try:
        return _SHOWN.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still shown as something
        return f"<{type(value).__name__}>"


def one_line(message: str) -> str:
    """A message as one printable line: line breaks and other control characters escaped,
    so that a name read from a file cannot split the line or drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
