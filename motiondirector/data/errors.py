"""The one error type for bad input data: it names the file and says what is wrong with it."""

from __future__ import annotations


class DataError(ValueError):
    """A source file cannot be used: `str(error)` is "<path>: <reason>".

    Reasons include: zero-byte file, truncated or corrupt video, not a video, too few frames
    ("has N frames at F fps, needs M"), unsupported image format, no caption.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # Ray ships exceptions between processes: rebuild from (path, reason)
        return type(self), (self.path, self.reason)
