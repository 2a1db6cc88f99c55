"""Dataset readers for the official layouts, and the one prepared form they all convert to."""
from .prepared import PreparedDataset, PreparedWriter, Sample, load_rgb
from .registry import DATASETS, DatasetSpec, prepare_dataset

__all__ = ["DATASETS", "DatasetSpec", "PreparedDataset", "PreparedWriter", "Sample", "load_rgb", "prepare_dataset"]
