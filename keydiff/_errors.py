"""keydiff's exceptions. Every error a user can cause is an ``InputError``: the CLI prints its one-line message
and exits with code 2. Unresolved keys are a result, not an error.

    KeydiffError
    └── InputError                      (exit 2)
        ├── CheckpointError             a checkpoint file cannot be read
        │   ├── CheckpointNotFound      (also FileNotFoundError)
        │   └── UnsafePickle            the file needs code execution to load
        ├── ModelError                  the model cannot be built
        ├── MappingFileError            a mapping JSON is malformed or of another version
        ├── MappingMismatch             a mapping does not fit the checkpoint it is applied to
        ├── OutputError                 an output path is refused or cannot be written
        └── UsageError                  malformed arguments (``-m key=value``, options)
"""

from __future__ import annotations

from os import PathLike

__all__ = [
    "CheckpointError",
    "CheckpointNotFound",
    "InputError",
    "KeydiffError",
    "MappingFileError",
    "MappingMismatch",
    "ModelError",
    "OutputError",
    "UnsafePickle",
    "UsageError",
]


class KeydiffError(Exception):
    """Root of keydiff's exceptions: ``except keydiff.KeydiffError`` catches every one of them."""


class InputError(KeydiffError, ValueError):
    """Something the user gave cannot be used; the message says what and what to do."""


class CheckpointError(InputError):
    """A checkpoint file cannot be read."""

    def __init__(self, path: str | PathLike[str], problem: str, remedy: str = "") -> None:
        self.path = str(path)
        self.problem = problem
        self.remedy = remedy
        message = f"{self.path}: {problem}"
        super().__init__(f"{message}. {remedy}" if remedy else message)


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist."""

    def __init__(self, path: str | PathLike[str]) -> None:
        super().__init__(path, "no such file or directory", "Check the path.")


class UnsafePickle(CheckpointError):
    """The checkpoint holds pickled objects that only arbitrary code execution could rebuild."""

    def __init__(self, path: str | PathLike[str], detail: str) -> None:
        super().__init__(
            path,
            f"loading it needs pickled code ({detail}); nothing was executed",
            "If you trust this file, rerun with --unsafe-pickle (it can run arbitrary code).",
        )


class ModelError(InputError):
    """The model cannot be built or read."""


class MappingFileError(InputError):
    """A mapping file is malformed, or of another schema version."""


class MappingMismatch(InputError):
    """A mapping does not fit the checkpoint it is applied to."""


class OutputError(InputError):
    """An output path is refused (it would overwrite an input) or cannot be written."""


class UsageError(InputError):
    """Malformed arguments."""
