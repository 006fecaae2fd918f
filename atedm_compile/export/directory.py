"""A build directory: made or reused, marked as a build's, locked while a build works in it, and
cleared of what interrupted builds left."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..files import remove_leftovers, write_atomically

MARKER = ".atedm-export"
LOCK = ".atedm-export.lock"
RAW = ".raw"


class BuildDirectory:
    """``directory`` made (or reused) and its lock held until ``close``: a second build into it
    waits for this one, then finds its work done. ``created``: it did not exist before;
    ``waited``: another build held it first."""

    def __init__(self, directory: Path, log: Callable[[str], None] = print):
        self.directory = Path(directory)
        self.log = log
        self.lock = None
        self.created = False
        self.waited = False
        from filelock import FileLock, Timeout

        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"output {directory} exists and is not a directory")

        def foreign() -> bool:
            return (directory.is_dir() and not (directory / MARKER).exists()
                    and any(p.name != LOCK for p in directory.iterdir()))

        if foreign():
            raise ValueError(f"output directory {directory} is not empty and was not made by atedm-compile build "
                             f"(no {MARKER} in it): refusing to write there; pick an empty or new directory")
        self.created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(directory / LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self.log(f"{directory} is locked by another build: waiting for it to finish")
            self.waited = True
            lock.acquire()
        self.lock = lock
        if foreign():  # made by another program while we waited
            self.close()
            raise ValueError(f"output directory {directory} is not empty and was not made by atedm-compile build")
        if not (directory / MARKER).exists():
            write_atomically(directory / MARKER, b"atedm-compile export directory\n")
        # Under the lock, a temporary file here can only be a dead build's; stale raw exports are
        # those of settings no longer asked for (each holds a full copy of the weights).
        for folder in (directory, directory / RAW, directory / "engines"):
            for path in remove_leftovers(folder):
                self.log(f"removed {path.relative_to(directory)}, left by an interrupted build")

    def close(self) -> None:
        """Release the directory's lock."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def raw_export_dir(directory: Path, entry) -> Path:
    """Where ``entry``'s graph is exported before its clean-up (keyed by its export key)."""
    return Path(directory) / RAW / f"{entry.name}-{entry.export_key[:16]}"
