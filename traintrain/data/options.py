"""The dataset settings of a training run (a plain dataclass, so the data package does not depend on the config)."""

from __future__ import annotations

from dataclasses import dataclass

from traintrain.data.buckets import Bucket, ImageSize, make_buckets
from traintrain.errors import TrainTrainError


@dataclass(frozen=True)
class DataOptions:
    """Image size "(height, width)" (order free), bucket rules, sub-images, mirroring, repeats and captions."""

    image_size: ImageSize = (512, 512)
    buckets_step: int = 256
    min_length: int = 512
    max_ratio: float = 2.0
    sub_image_num: int = 0
    mirroring: bool = False
    num_multiply: int = 1
    use_filename_as_tag: bool = False
    disable_upscale: bool = False
    trigger_word: str = ""

    def __post_init__(self) -> None:
        if self.sub_image_num < 0:
            raise TrainTrainError(f"Sub image num is {self.sub_image_num}: set 0 or more.")
        if self.num_multiply < 1:
            raise TrainTrainError(f"Image num multiply is {self.num_multiply}: set 1 or more.")

    def buckets(self) -> tuple[list[Bucket], list[Bucket]]:
        """Main and sub buckets; an error when sub-images are asked for but no sub bucket exists."""
        main, sub = make_buckets(self.image_size, self.buckets_step, self.min_length, self.max_ratio)
        if self.sub_image_num > 0 and not sub:
            raise TrainTrainError(
                f"Sub image num is {self.sub_image_num} but these settings give no sub-image bucket: lower image min "
                "length or image buckets step, or set sub image num to 0."
            )
        return main, sub
