"""``OUT/config.json["fdcache"]["run"]``: what a run was asked to do (the resolved options,
the preset they started from) and with which software, readable without unpickling a
checkpoint. The same file later holds the export's timm config (:mod:`fdcache.exports`)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path

__all__ = ["PACKAGES", "versions", "record_run"]

PACKAGES = ("fdcache", "torch", "torchvision", "timm", "open_clip_torch", "zarr", "numcodecs", "triton",
            "nvidia-dali-cuda130", "numpy")


def versions() -> dict:
    """Installed versions of what a run's numbers depend on (metadata only: nothing imported)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def record_run(out: str | Path, command: str, options: dict, *, preset: str | None = None,
               resume: bool = False) -> None:
    """Write the run block (rank 0; called by the engine once the run has claimed ``out``).
    A fresh run starts the file anew when fdcache wrote it (a replaced run's export block
    would describe weights that are gone); a resumed run keeps its export block."""
    from .exports import CONFIG, read_json, update_fdcache_block, write_json

    out = Path(out)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG
    if not resume and path.exists() and "fdcache" in read_json(path):
        write_json(path, {})
    update_fdcache_block(out, run={"command": command, "preset": preset, "options": options,
                                   "argv": sys.argv[1:] if Path(sys.argv[0]).name in ("fdcache", "__main__.py") else None,
                                   "versions": versions()})
