"""Safe file writing: atomic replace, no overwrite unless asked, every path kept inside its folder."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError
from safetensors.torch import save_file

from traintrain.errors import TrainTrainError

log = logging.getLogger(__name__)


TEMP_SUFFIX = ".tmp"
# mkstemp's name: ".<final name>.<pid of the writer>.<8 random characters>.tmp" (older saves had no pid)
_TEMP_NAME = re.compile(r"\..+?\.(?:safetensors|json|csv|png)\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp")
STALE_SECONDS = 3600.0  # a temp file of a live process older than this belongs to no running save


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success it is flushed to disk and replaces `path`, on failure it
    is removed. An OSError while writing (disk full, permissions) becomes a TrainTrainError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as error:
        raise TrainTrainError(f"Cannot write into {path.parent}: {error.strerror or error}.") from error
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _new_file_mode())  # mkstemp makes the file owner-only; give it a normal file's permissions
        _sync_file(tmp)
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except OSError as error:
        raise TrainTrainError(write_failure(path, error)) from error
    finally:
        if tmp.exists():
            tmp.unlink()


def save_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as a `.safetensors` file atomically; a full disk is the same clear message as any other write."""
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as error:  # safetensors reports I/O failures (disk full) as its own error type
            raise TrainTrainError(write_failure(Path(path), error)) from error
    return Path(path)


def write_failure(path: Path, error: BaseException) -> str:
    """The message for a failed write of `path`: disk full and permissions say what to do."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    if _is_disk_full(error):
        return f"Could not write {path}: the disk is full (No space left on device). Free some space and try again."
    return f"Could not write {path}: {reason}. Check free space and permissions."


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


def _sync_file(path: Path) -> None:
    """Flush the file's data to the disk, so a power loss cannot leave it empty under its final name (opened for
    writing: Windows flushes only writable handles)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Flush the folder's entry of the renamed file (POSIX; Windows cannot open folders and needs no sync)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files `atomic_path` left in `folder` when a process was killed mid-save; returns them.

    Only this project's pattern is touched, and only when the process that wrote it has ended (or, where that cannot
    be known, after an hour), so a save in progress is never disturbed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _TEMP_NAME.fullmatch(path.name)
        try:
            if match and path.is_file() and _abandoned(match["pid"], path.stat().st_mtime):
                path.unlink()
                removed.append(path)
        except OSError as error:
            log.warning("Could not remove the unfinished temp file %s: %s", path, error.strerror or error)
    if removed:
        log.info("Removed %d unfinished temp file(s) of an interrupted save from %s.", len(removed), folder)
    return removed


def _abandoned(pid: str | None, mtime: float) -> bool:
    """Whether no running save can own a temp file written by `pid` (None: unknown) and last changed at `mtime`."""
    if pid is not None and int(pid) == os.getpid():
        return False
    if pid is not None and not _process_alive(int(pid)):
        return True
    return time.time() - mtime > STALE_SECONDS


def _process_alive(pid: int) -> bool:
    """Whether process `pid` runs (POSIX); True where that cannot be asked without side effects (Windows)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def check_writable(folder: Path) -> None:
    """Raise a TrainTrainError now (not after hours of training) when files cannot be created in `folder`."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".traintrain-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise TrainTrainError(
            f"Cannot write into {folder}: {error.strerror or error}. Fix its permissions or free space first."
        ) from error


def read_json(path: Path, what: str) -> Any:
    """The JSON value in `path`; a missing, unreadable, invalid or absurdly nested file is a TrainTrainError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as error:
        raise TrainTrainError(f"Cannot read the {what} {path}: {error.strerror or error}.") from error
    except (ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise TrainTrainError(f"The {what} {path} is not valid JSON ({reason}): fix it or save it again.") from error


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


def is_file(path: str | Path) -> bool:
    """Whether `path` names an existing file; False (never an error) for a blank, too long or otherwise impossible path."""
    return _stat_test(path, Path.is_file)


def is_dir(path: str | Path) -> bool:
    """Whether `path` names an existing folder; False (never an error) for a blank, too long or impossible path."""
    return _stat_test(path, Path.is_dir)


def _stat_test(path: str | Path, test: Any) -> bool:
    if not str(path).strip():
        return False
    try:
        return bool(test(Path(path).expanduser()))
    except (OSError, ValueError):  # ENAMETOOLONG, a NUL byte, an unreadable parent: it cannot be used
        return False


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
