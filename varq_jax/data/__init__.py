"""Datasets generated in-project (no download), by name: a training config's `dataset` and an export's metadata."""
import types

from varq_jax.data import shapes, shapes100
from varq_jax.data.shapes import (CLASS_NAMES, NUM_CLASSES, batch_indices, labels_of, make_batch,
                                  make_batch_uint8, to_float, to_uint8)

DATASETS = {"shapes": shapes, "shapes100": shapes100}
DEFAULT = "shapes"
__all__ = ["DATASETS", "DEFAULT", "get", "of_config", "shapes", "shapes100", "CLASS_NAMES", "NUM_CLASSES",
           "batch_indices", "labels_of", "make_batch", "make_batch_uint8", "to_float", "to_uint8"]


def get(name: str) -> types.ModuleType:
    """The dataset module `name` (NUM_CLASSES, CLASS_NAMES, make_batch, make_batch_uint8, batch_indices)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def of_config(config) -> types.ModuleType:
    """The dataset of a training config (configs written before datasets had names train on `shapes`)."""
    return get(config.get("dataset", DEFAULT))
