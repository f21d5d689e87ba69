"""Text and JSON files fdcache reads from a user (file lists, class names, a run's
``model.json`` and ``config.json``, a WiSE-FT sweep): every way such a file can be wrong
(missing, a folder, not UTF-8 text, not JSON, cut short) is one named error saying which
file, which option, and what to do, instead of a decoder's traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DataError

__all__ = ["read_json", "read_text"]


def read_text(path: str | os.PathLike, what: str, option: str, fix: str) -> str:
    """The UTF-8 text of ``path``, which should be ``what`` (given as ``option``)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not {what}: byte {e.start} is not UTF-8 text ({option}): {fix}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not {what} ({option}): {fix}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e} ({option}): {fix}") from None


def read_json(path: str | os.PathLike, what: str, option: str, fix: str):
    """The JSON value in ``path`` (see :func:`read_text`)."""
    text = read_text(path, what, option, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not {what}: not valid JSON ({e.msg}, line {e.lineno}; cut short?) ({option}): "
                        f"{fix}") from None
