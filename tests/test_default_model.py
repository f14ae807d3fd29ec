"""The shipped default model: it loads, samples in CI time on the CPU, and its samples are recognisable."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varq_jax import default_model, image_io, sampling
from varq_jax.data import shapes
from varq_jax.models.classifier import class_accuracy
from varq_jax.train import export

CLASSIFIER = str(default_model.ASSETS / "default" / "classifier")


@pytest.fixture(scope="module")
def model():
    assert default_model.default_path() is not None, "the embedded default model is not shipped"
    return default_model.load_model()


@pytest.fixture(scope="module")
def classifier():
    cfg, params, info = export.load_model(CLASSIFIER, "classifier")
    return cfg, params


def test_loads_with_provenance(model):
    assert not model.meta.get("random_weights")
    prov = model.meta["provenance"]
    assert prov["command"].startswith("python -m experiments.train") and prov["seed"] == 0
    assert len(prov["commit"]) == 40 and prov["device"]
    assert model.var_cfg.num_classes == shapes.NUM_CLASSES and model.vae_cfg.image_size == 64
    assert _size(default_model.ASSETS / "default") < 25e6


def _size(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_the_research_model_is_shipped_with_provenance_within_16_mb():
    """Issue 18: the second embedded model, its own 100-class classifier, ≤ 16 MB of files."""
    from varq_jax.eval import features
    research = default_model.load_model("research")
    prov = research.meta["provenance"]
    assert prov["command"].startswith("python -m experiments.train --config=configs/train_research.py")
    assert research.var_cfg.num_classes == 100 and research.var_cfg.depth >= 12
    assert research.var_cfg.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    clf = features.load_classifier(str(default_model.ASSETS / "research" / "classifier"))
    assert clf.info["num_classes"] == 100 and clf.info["dataset"] == "shapes100" and clf.info["test_accuracy"] >= 0.95
    assert _size(default_model.ASSETS / "research") <= 16e6, f"{_size(default_model.ASSETS / 'research') / 1e6} MB"


def test_classifier_recognises_fresh_real_images(classifier):
    cfg, params = classifier
    images, labels = shapes.make_batch_uint8(12345, np.arange(500), split="test")
    assert class_accuracy(cfg, params, np.asarray(images), np.asarray(labels), 100) >= 0.95


def test_samples_are_recognisable(model, classifier):
    """A real check of the trained model: 50 samples (5 per class, fixed key) at sharpened display settings
    (CFG 3, top-k 64, top-p 0.8) are classified as their labels at least 90% of the time."""
    settings = sampling.SamplingConfig(cfg=3.0, top_k=64, top_p=0.8)
    labels = np.arange(50) % model.var_cfg.num_classes
    images, _ = sampling.Sampler(model.vae_cfg, model.var_cfg, settings, jnp.float32)(
        model.params, labels, jax.random.PRNGKey(1))
    assert images.shape == (50, 64, 64, 3)
    cfg, params = classifier
    assert class_accuracy(cfg, params, image_io.to_uint8(images), labels, 50) >= 0.9
