"""One error family. Messages say what happened, to which file or sample, and what to do."""

from __future__ import annotations


class FdcacheError(Exception):
    """Base class; the CLI turns it into a one-paragraph message and exit code 2."""

    exit_code = 2


class DataError(FdcacheError):
    """The image folder or file list is missing, empty, or holds unreadable images."""


class BadImageError(DataError):
    """One or more images cannot be decoded; ``paths`` names them (relative to the root)."""

    def __init__(self, message: str, paths: list[str] = ()):
        super().__init__(message)
        self.paths = list(paths)


class StoreMismatchError(FdcacheError):
    """An existing store was made from another teacher, dataset, view policy or codec."""


class StoreError(FdcacheError):
    """The store is unreadable, incomplete, corrupt, or not an fdcache store."""


class TeacherError(FdcacheError):
    """Unknown teacher name, missing weights choice, or an unsupported architecture."""


class VerifyError(FdcacheError):
    """``fdcache verify`` found problems; ``problems`` lists them."""

    exit_code = 1

    def __init__(self, message: str, problems: list[str] = ()):
        super().__init__(message)
        self.problems = list(problems)
