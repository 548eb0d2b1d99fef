"""Finding the image files of a data folder: recursive, case-insensitive extensions, hidden files skipped, sorted."""

from __future__ import annotations

from pathlib import Path

from traintrain.errors import TrainTrainError
from traintrain.files import is_dir

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff", ".bmp", ".webp", ".pcx", ".ico"})


def data_folder(folder: str | Path) -> Path:
    """The folder as a Path; an error when it is unset or missing."""
    if not str(folder).strip():
        raise TrainTrainError("No data folder is set: choose the folder that holds the training images.")
    path = Path(folder).expanduser()
    if not is_dir(path):
        raise TrainTrainError(f"The data folder {path} does not exist: choose a folder that holds the training images.")
    return path


def is_image_file(path: Path, root: Path) -> bool:
    """A visible image file below `root` (no part of its relative path starts with a dot)."""
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    return not hidden and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def discover_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder`, sorted by relative path; an error when there is none."""
    root = data_folder(folder)
    paths = sorted((p for p in root.rglob("*") if is_image_file(p, root)), key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        extensions = " ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise TrainTrainError(f"No images found in {root}: put image files ({extensions}) in it or its subfolders.")
    return paths
