"""Data sources, the decode-once cache and long-tailed subset builders."""
from imbssl.data.longtail import (
    balanced_counts,
    class_ranks,
    exp_counts,
    labeled_unlabeled_split,
    load_index_meta,
    load_indices,
    read_split_file,
    save_indices,
    select_subset,
    step_counts,
    subset_counts,
    unlabeled_counts,
)
from imbssl.data.sources import DataError, ImageSet, load_splits, without_labels
from imbssl.data.stream import StreamedImages, training_images

__all__ = [
    "DataError",
    "ImageSet",
    "StreamedImages",
    "balanced_counts",
    "class_ranks",
    "exp_counts",
    "labeled_unlabeled_split",
    "load_index_meta",
    "load_indices",
    "read_split_file",
    "load_splits",
    "save_indices",
    "select_subset",
    "step_counts",
    "subset_counts",
    "training_images",
    "unlabeled_counts",
    "without_labels",
]
