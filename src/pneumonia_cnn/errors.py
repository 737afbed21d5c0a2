"""Errors that carry a one-line, user-facing message naming the file and the reason."""
import re

# a decoder's reason may name its in-memory stream ("cannot identify image file <_io.BytesIO object at 0x7f..>"):
# the address means nothing to a reader and tells a client about the server's memory
OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


# a model file of another kind given where a checkpoint goes: what it is, and what to give instead
EXPORTED = "an exported model, which pneumonia-cnn does not score; give the checkpoint it was exported from"
KERAS = "a Keras model; import it first (pneumonia-cnn import-keras FILE --out model.pt) and give model.pt"
OTHER_MODEL_FILES = {".onnx": EXPORTED, ".ts": EXPORTED, ".torchscript": EXPORTED, ".h5": KERAS, ".keras": KERAS}


class PneumoniaCNNError(Exception):
    """Base class: the CLI prints ``str(error)`` on one line and exits non-zero, never a traceback."""


class ImageReadError(PneumoniaCNNError):
    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = OBJECT_REPR.sub("<stream>", reason)
        super().__init__(f"{self.path}: {self.reason}")


class DatasetError(PneumoniaCNNError):
    pass


class CheckpointError(PneumoniaCNNError):
    pass


class ConfigError(PneumoniaCNNError, ValueError):
    """A configuration value that is not allowed; the message names the field."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line: libraries that list several causes (pydicom's decoders: a header
    line, then one indented line per plugin) keep them all, joined, instead of losing them to the header."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = " ".join(lines) or type(error).__name__
    return message if len(message) <= limit else message[:limit - 1] + "…"
