"""Datasets generated in-project (no download)."""
from varq_jax.data.shapes import (CLASS_NAMES, NUM_CLASSES, batch_indices, labels_of, make_batch,
                                  make_batch_uint8, to_float, to_uint8)
