"""Safe file writing: atomic replace, no overwrite unless asked, every path kept inside its folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from traintrain.errors import TrainTrainError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success it replaces `path`, on failure it is removed. An OSError
    while writing (disk full, permissions) becomes a TrainTrainError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise TrainTrainError(f"Cannot write into {path.parent}: {error.strerror or error}.") from error
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode())  # mkstemp makes the file owner-only; give it a normal file's permissions
        os.replace(tmp, path)
    except OSError as error:
        raise TrainTrainError(
            f"Could not write {path}: {error.strerror or error}. Check free space and permissions."
        ) from error
    finally:
        if tmp.exists():
            tmp.unlink()


def _new_file_mode() -> int:
    """The mode `open()` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> Path:
    """Write text atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def plain_name(name: str, hint: str) -> str:
    """`name` when it is a plain file name (no folders, no `..`, no glob characters); else a TrainTrainError + `hint`."""
    if not name or any(c in name for c in "/\\*?[]") or ".." in name:
        raise TrainTrainError(f"{name!r} is not a plain file name: {hint}")
    return name


def inside(folder: Path, name: str) -> Path:
    """`folder/name`, refused unless it resolves inside `folder`."""
    folder = Path(folder).resolve()
    path = (folder / name).resolve()
    if folder != path and folder not in path.parents:
        raise TrainTrainError(f"{name!r} would be written outside {folder}: use a plain file name.")
    return path


def output_path(folder: Path, stem: str, suffix: str, overwrite: bool) -> Path:
    """Where to write `stem+suffix` in `folder`: the name itself, or with overwrite off and the file present, an error."""
    path = inside(folder, stem + suffix)
    if path.exists() and not overwrite:
        raise TrainTrainError(f"{path.name} already exists in {folder}: tick 'save overwrite' or choose another name.")
    return path


def free_path(folder: Path, stem: str, suffix: str) -> Path:
    """`folder/stem+suffix`, or the first free `stem_1`, `stem_2`, … when it exists: a name that replaces nothing."""
    path = inside(folder, stem + suffix)
    number = 0
    while path.exists():
        number += 1
        path = inside(folder, f"{stem}_{number}{suffix}")
    return path
