"""Files written whole or not at all, and the temporary files a dead process left behind.

Every artefact of this package (images, manifests, graphs, weights, evaluation results) is written
to a temporary name beside its target and renamed onto it: a reader sees the old file or the new
one, never part of one. Temporary names say which process on which machine writes them, so that
``remove_leftovers`` removes what a dead process left and nothing a live one is still writing.
Finished files get the permissions a plain ``open`` would give them (``0o666`` less the umask).
Content keys (``sha256_file``, ``sha256_json``) say what a file or a set of settings holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def temp_prefix(name: str) -> str:
    """Prefix of a temporary file or folder on its way to becoming ``name``: hidden, and naming
    this process and machine, so that ``remove_leftovers`` can tell what a dead process left from
    what a live one is still writing."""
    return f".{name}.pid{os.getpid()}@{_host()}."


_TEMP = re.compile(r"^\..+\.pid(\d+)@([^.]+)\.")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary files and folders (``temp_prefix``) in ``folder`` that a process of
    this machine left when it died (killed, out of memory, power cut); others' are left alone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    try:
        paths = list(folder.iterdir())
    except OSError:  # not ours to read: nothing of ours in it
        return removed
    for path in paths:
        match = _TEMP.match(path.name)
        if match is None or match.group(2) != _host() or _alive(int(match.group(1))):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError:  # read-only, or gone meanwhile: leave it
            continue
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def write_atomically(path: str | Path, data: bytes | Callable[[str], object]) -> None:
    """Write ``path`` whole or not at all: ``data`` (bytes), or what ``data(tmp)`` writes to the
    temporary file's name, goes to a temporary file beside ``path`` that is then renamed onto it.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> write_atomically(folder / "a.txt", b"hello")
        >>> write_atomically(folder / "b.txt", lambda tmp: pathlib.Path(tmp).write_text("hi"))
        >>> sorted(p.name for p in folder.iterdir()), (folder / "a.txt").read_bytes()
        (['a.txt', 'b.txt'], b'hello')
    """
    with replacing(path) as tmp:
        if callable(data):
            data(tmp)
        else:
            Path(tmp).write_bytes(data)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[str]:
    """The name of a new temporary file beside ``path``, for a writer that needs the block's time
    (``write_atomically`` for one that does not): when the block ends the file is renamed onto
    ``path``; where it raises, the file is removed and ``path`` left as it was.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.bin"
        >>> with replacing(target) as tmp, open(tmp, "wb") as handle:
        ...     _ = handle.write(b"one"); _ = handle.write(b"two")
        >>> target.read_bytes()
        b'onetwo'
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".part")
    os.close(fd)
    try:
        yield tmp
        publish(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.filename in (None, tmp):  # a full disk or a file-size limit: say which file it was
            raise OSError(error.errno, error.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def folder_atomically(folder: str | Path, keep_existing: bool = False) -> Iterator[Path]:
    """A new temporary folder beside ``folder`` to fill: when the block ends it becomes ``folder``,
    replacing any earlier one (``keep_existing``: an existing ``folder`` is kept and this one
    dropped, as another process made the same); where the block raises, it is removed.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "graphs"
        >>> with folder_atomically(target) as tmp:
        ...     _ = (tmp / "a.onnx").write_bytes(b"graph")
        >>> [p.name for p in target.iterdir()]
        ['a.onnx']
    """
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=temp_prefix(folder.name)))
    try:
        yield tmp
        if not keep_existing:
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (keep_existing and folder.is_dir()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_folder(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; the folders made, outermost first (for
    ``remove_folders`` to take back where what was to go in them could not be written)."""
    made = []
    for parent in [*reversed(Path(folder).parents), Path(folder)]:
        if not parent.exists():
            parent.mkdir()
            made.append(parent)
    return made


def remove_folders(made: list[Path]) -> None:
    """Remove the folders ``make_folder`` made, innermost first, where they are still empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:  # something else went in meanwhile: it stays
            return


def publish(tmp: str | Path, path: Path) -> None:
    """Rename a finished temporary file onto ``path`` with the permissions a plain ``open`` would
    give it (mkstemp makes files private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """The sha256 of a file's bytes (hex), read in chunks: weights files can be gigabytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data) -> str:
    """The sha256 (hex) of ``data`` as JSON with sorted keys (anything JSON lacks: its ``str``).

    Example:
        >>> sha256_json({"b": 1, "a": [2]}) == sha256_json({"a": [2], "b": 1})
        True
    """
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
