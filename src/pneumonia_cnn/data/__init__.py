"""Floor 1: files -> arrays. Knows nothing of models."""
from .augment import AugmentConfig, augment_batch
from .cache import CachedImages, build_or_load, default_cache_dir, preprocess_file
from .dataset import DEFAULT_CLASS_NAMES, ImageList, load_split, patient_id, patient_split, read_csv_list, scan_folder
from .readers import ImageMeta, read_image

__all__ = ["AugmentConfig", "augment_batch", "CachedImages", "build_or_load", "default_cache_dir",
           "preprocess_file", "DEFAULT_CLASS_NAMES", "ImageList", "load_split", "patient_id", "patient_split",
           "read_csv_list", "scan_folder", "ImageMeta", "read_image"]
