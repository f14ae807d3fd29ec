"""The embedded default model: the small VAR trained in-project and shipped inside the package.

Every CLI uses it when no --checkpoint is given. Until it is shipped, a random-weight tiny model stands in,
labelled as such in its metadata and in everything printed about it.
"""
import importlib.resources
import os
from typing import Optional

import jax

from varq_jax import checkpoint
from varq_jax.models import zoo
from varq_jax.models.build import init_params

ASSETS = importlib.resources.files("varq_jax") / "assets"
DEFAULT_MODELS = "default/vae_var"
# models shipped in the package, by the name --checkpoint takes: the quickstart default and the research model
# (harder data, 100 classes, depth 12, ten scales: where quantization hurts as on ImageNet)
EMBEDDED = ("default", "research")


def embedded_path(name: str) -> Optional[str]:
    path = str(ASSETS / name / "vae_var")
    return path if os.path.isdir(path) else None


def default_path() -> Optional[str]:
    return embedded_path("default")


def resolve(path: Optional[str]) -> Optional[str]:
    """A --checkpoint value as a directory: an embedded model's name becomes its path inside the package."""
    if path not in EMBEDDED:
        return path
    found = embedded_path(path)
    if found is None:
        raise ValueError(f"the embedded {path!r} model is not shipped in this installation ({ASSETS / path})")
    return found


def random_tiny() -> checkpoint.ModelCheckpoint:
    vae_cfg, var_cfg = zoo.tiny()
    params = init_params(vae_cfg, var_cfg, jax.random.PRNGKey(0))
    meta = {"random_weights": True, "description": "RANDOM-WEIGHT tiny model (no trained default is shipped)"}
    return checkpoint.ModelCheckpoint(vae_cfg, var_cfg, params, meta)


def load_model(path: Optional[str] = None, **kwargs) -> checkpoint.ModelCheckpoint:
    """A checkpoint directory (full-precision or quantized), an embedded model's name, or the embedded default when
    `path` is None."""
    path = resolve(path)
    if path is not None:
        from varq_jax.quant.export import load_any
        return load_any(path, **kwargs)
    if kwargs.pop("execution", "simulate") != "simulate":
        raise ValueError("integer execution needs a quantized checkpoint (--checkpoint); the embedded default "
                         "model is full precision")
    default = default_path()
    return checkpoint.load(default, **kwargs) if default else random_tiny()


def describe(ck: checkpoint.ModelCheckpoint) -> str:
    v = ck.var_cfg
    what = ck.meta.get("description") or ck.meta.get("name") or "VAR"
    return (f"{what}: depth {v.depth}, width {v.width}, heads {v.heads}, patch_nums {v.patch_nums}, "
            f"{v.num_classes} classes, vocab {v.vocab_size}")
