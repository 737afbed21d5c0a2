"""Errors that carry a one-line, user-facing message naming the file and the reason."""


class PneumoniaCNNError(Exception):
    """Base class: the CLI prints ``str(error)`` on one line and exits non-zero, never a traceback."""


class ImageReadError(PneumoniaCNNError):
    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class DatasetError(PneumoniaCNNError):
    pass


class CheckpointError(PneumoniaCNNError):
    pass


class ConfigError(PneumoniaCNNError, ValueError):
    """A configuration value that is not allowed; the message names the field."""
