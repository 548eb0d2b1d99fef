"""Training data: image discovery, captions and trigger word, buckets, sub-images, mirroring, latent cache, pairs."""

from trainer.data.buckets import Bucket, make_buckets, nearest_buckets, parse_image_size
from trainer.data.captions import image_prompt, join_prompt, tag_frequency
from trainer.data.dataset import ImageDataset, Sample, load_image_dataset
from trainer.data.files import IMAGE_EXTENSIONS, discover_images
from trainer.data.latents import Batch, LatentDataset
from trainer.data.options import DataOptions
from trainer.data.pairs import PairBatch, PairDataset, PairedLatentDataset, load_pair_dataset, match_pairs

__all__ = [
    "IMAGE_EXTENSIONS",
    "Batch",
    "Bucket",
    "DataOptions",
    "ImageDataset",
    "LatentDataset",
    "PairBatch",
    "PairDataset",
    "PairedLatentDataset",
    "Sample",
    "discover_images",
    "image_prompt",
    "join_prompt",
    "load_image_dataset",
    "load_pair_dataset",
    "make_buckets",
    "match_pairs",
    "nearest_buckets",
    "parse_image_size",
    "tag_frequency",
]
