"""The feature networks metrics are computed with: the FID Inception (converted weights) or the trained shapes
classifiers shipped beside the embedded models (never random weights), run data-parallel over the mesh.
"""
import dataclasses
import functools
import os
from typing import Any, Callable, Dict, Optional

import jax.numpy as jnp
import numpy as np

from varq_jax import default_model, parallel
from varq_jax.eval import metrics

MIN_CLASSIFIER_TEST_ACCURACY = 0.5               # below this an exported classifier is treated as untrained


@dataclasses.dataclass(frozen=True)
class FeatureNet:
    """A feature network: `apply(variables, uint8 images [B, H, W, 3]) → {name: [B, ...] float32}` (a stable,
    jittable function), its variables, the input size it was trained for (None: any) and a description."""
    kind: str                     # "inception" | "classifier"
    apply: Callable
    variables: Any
    image_size: Optional[int]
    source: str
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)


def _inception_apply(variables, images):
    from varq_jax.eval.inception import InceptionV3
    f = InceptionV3().apply(variables, images)
    return {"pool": f.pool, "spatial": f.spatial, "logits": f.logits}


def load_inception(path: str) -> FeatureNet:
    from varq_jax.eval.convert_inception import load_variables
    return FeatureNet("inception", _inception_apply, load_variables(path), None, path)


@functools.lru_cache(maxsize=None)
def _classifier_apply(cfg) -> Callable:
    from varq_jax.models.classifier import Classifier

    def apply(params, images):
        logits, features = Classifier(cfg).apply({"params": params}, images.astype(jnp.float32) / 127.5 - 1.0)
        return {"logits": logits, "features": features}
    return apply


def embedded_classifier_paths() -> list:
    """The classifiers shipped beside the embedded models, the default's first."""
    paths = (str(default_model.ASSETS / name / "classifier") for name in default_model.EMBEDDED)
    return [p for p in paths if os.path.isdir(p)]


def load_classifier(path: str) -> FeatureNet:
    """An exported classifier (Orbax params/ + info.json of kind "classifier"); refuses an untrained one."""
    from varq_jax.models.classifier import ClassifierConfig
    from varq_jax.train import export
    params, info = export.load(path, kind="classifier")
    meta = info.get("meta", {})
    acc = (meta.get("eval") or {}).get("acc")
    if not meta.get("steps") or acc is None or acc < MIN_CLASSIFIER_TEST_ACCURACY:
        raise ValueError(f"classifier {path} does not look trained (steps {meta.get('steps')}, test accuracy {acc}); "
                         f"its features would make meaningless metrics")
    cfg = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()})
    return FeatureNet("classifier", _classifier_apply(cfg), export.as_float32(params), meta.get("image_size"), path,
                      {"num_classes": cfg.num_classes, "test_accuracy": float(acc), "steps": int(meta["steps"]),
                       "dataset": meta.get("dataset", "shapes")})      # exports before datasets had names: shapes


def extract_features(net: FeatureNet, images, mesh, per_device_batch: int) -> Dict[str, np.ndarray]:
    """Features of uint8 images (an array, an iterable of arrays, or an ADM npz path, streamed), data-parallel."""
    if isinstance(images, str):
        images = metrics.load_reference_batch(images).iter_images(per_device_batch * parallel.data_size(mesh))
    return parallel.map_batched(net.apply, net.variables, images, mesh, per_device_batch)
