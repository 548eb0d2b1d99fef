"""Prompts of training images: caption files or file-name tags, joined with the trigger word; tag counts."""

from __future__ import annotations

import errno
import logging
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

CAPTION_SUFFIXES = (".txt", ".caption")  # the first one found wins


def read_caption(image_path: Path) -> str:
    """The stripped text of `<stem>.txt`, else of `<stem>.caption`, else "".

    A caption that cannot be read (permissions, a name too long to exist) is skipped with a warning: one entry never
    ends the run."""
    for suffix in CAPTION_SUFFIXES:
        caption_path = image_path.with_suffix(suffix)
        try:
            if caption_path.is_file():
                return caption_path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError as error:
            if error.errno != errno.ENAMETOOLONG:  # a name too long to exist is simply no caption
                log.warning("Training %s without its caption: cannot read %s (%s).", image_path.name, caption_path,
                            error.strerror or error)  # fmt: skip
    return ""


def filename_tags(stem: str) -> str:
    """Tags from a file name: the stem cut at the first "_id_", then "_" turned into ","."""
    return stem.split("_id_", 1)[0].replace("_", ",").strip(" ,")


def join_prompt(trigger: str, caption: str) -> str:
    """`trigger, caption`; either alone when the other is empty (never a leading ", ")."""
    return ", ".join(part for part in (trigger.strip(), caption.strip()) if part)


def image_prompt(image_path: Path, trigger: str, use_filename_as_tag: bool = False) -> str:
    """The prompt of one image: its caption (or file-name tags when asked) after the trigger word."""
    caption = filename_tags(image_path.stem) if use_filename_as_tag else read_caption(image_path)
    return join_prompt(trigger, caption)


def tag_frequency(prompts: list[str]) -> dict[str, int]:
    """How often each comma-separated, stripped tag occurs (kohya's `ss_tag_frequency`), most frequent first."""
    counts = Counter(tag.strip() for prompt in prompts for tag in prompt.split(",") if tag.strip())
    return dict(counts.most_common())
