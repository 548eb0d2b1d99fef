"""Per-step caption variation: shuffled tags (the first N kept in place), tag dropout and whole-caption dropout."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionOptions:
    """Shuffle the comma-separated tags after the first `keep_tokens`; drop each of those tags with
    `tag_dropout_rate`; train on an empty caption with `dropout_rate`."""

    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0

    @property
    def varies(self) -> bool:
        """Whether captions change from step to step (else they are used exactly as read)."""
        return self.shuffle or self.dropout_rate > 0 or self.tag_dropout_rate > 0


def vary_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """One step's version of `caption`; unchanged when `options` vary nothing."""
    if not options.varies:
        return caption
    if options.dropout_rate > 0 and rng.random() < options.dropout_rate:
        return ""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    kept, rest = tags[: options.keep_tokens], tags[options.keep_tokens :]
    if options.tag_dropout_rate > 0:
        rest = [tag for tag in rest if rng.random() >= options.tag_dropout_rate]
    if options.shuffle:
        rng.shuffle(rest)
    return ", ".join(kept + rest)


class CaptionVariation:
    """Varies the captions of each batch with its own seeded random stream (reproducible with the training seed)."""

    def __init__(self, options: CaptionOptions, seed: int) -> None:
        self.options = options
        self.rng = random.Random(seed)

    def __call__(self, captions: list[str]) -> list[str]:
        """This step's captions of a batch."""
        return [vary_caption(caption, self.options, self.rng) for caption in captions]
