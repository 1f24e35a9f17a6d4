"""Data sets by name with train / held-out / test splits."""

from edgeprune.data.datasets import NAMES, Dataset, carve_heldout, load_dataset
from edgeprune.data.splits import ArraySplit, Augment, Split

__all__ = ["NAMES", "ArraySplit", "Augment", "Dataset", "Split", "carve_heldout", "load_dataset"]
