"""Errors meant for the user: the CLI prints their message alone, without a
traceback, and exits non-zero. Anything else is a bug and keeps its traceback."""


class CnnexpError(Exception):
    """A problem the user can fix; the message says what and how."""

    exit_code = 1


class ConfigError(CnnexpError):
    """A config value that is out of range or inconsistent."""

    exit_code = 2


class DataError(CnnexpError):
    """Data that cannot be downloaded, read or trusted."""


class TrainingDiverged(CnnexpError):
    """The loss became NaN or infinite."""


class DiskFull(CnnexpError):
    """No space left (or quota exceeded) while writing a file."""


class NotWritable(CnnexpError):
    """A directory cnnexp writes into became read-only or forbidden."""


class UntrustedFile(CnnexpError):
    """A .pt file that would run code when unpickled (it holds more than tensors and plain values)."""

    exit_code = 2
