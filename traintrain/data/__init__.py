"""Training data: image discovery, captions and trigger word, buckets, sub-images, mirroring, latent cache, pairs."""

from traintrain.data.buckets import Bucket, make_buckets, nearest_buckets, parse_image_size
from traintrain.data.captions import image_prompt, join_prompt, tag_frequency
from traintrain.data.dataset import ImageDataset, Sample, load_image_dataset
from traintrain.data.files import IMAGE_EXTENSIONS, discover_images
from traintrain.data.latents import Batch, LatentDataset
from traintrain.data.options import DataOptions
from traintrain.data.pairs import PairBatch, PairDataset, PairedLatentDataset, load_pair_dataset, match_pairs

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
