"""Turns the training exports into the embedded default model shipped inside the package.

VQVAE + VAR become one varq-jax checkpoint (`varq_jax/assets/default/vae_var`, what every CLI loads when no
--checkpoint is given); the classifier export is copied beside it (`.../classifier`) for the quality metrics.
The provenance (training command, seed, commit, card, training metrics) goes into the metadata.
"""
import os
import shutil

from varq_jax import checkpoint, files
from varq_jax.train import export

TRAIN_COMMAND = "python -m experiments.train --config=configs/train_default.py --workdir=runs/default --stage=all"
# the embedded models: (name in the metadata, training commands)
MODELS = {
    "default": ("varq-shapes default (64 px, 10 synthetic classes)", TRAIN_COMMAND),
    "research": ("varq-shapes100 research (64 px, 100 classes, ten scales, depth 12)",
                 "python -m experiments.train --config=configs/train_research.py --workdir=runs/research "
                 "--stage=vqvae,classifier; python -m experiments.train --config=configs/train_research.py "
                 "--workdir=runs/research --stage=var"),
}


def ship_default(workdir: str, assets_dir: str, *, commit: str, device: str, date: str,
                 command: str = TRAIN_COMMAND, name: str = MODELS["default"][0], card: dict = None) -> str:
    """`card`: measured facts to keep in the metadata (training times, acceptance numbers)."""
    vae_params, vae_info = export.load(os.path.join(workdir, "vqvae", "export"), "vqvae")
    var_params, var_info = export.load(os.path.join(workdir, "var", "export"), "var")
    vae_cfg, _, _ = export.load_model(os.path.join(workdir, "vqvae", "export"), "vqvae")
    var_cfg, _, _ = export.load_model(os.path.join(workdir, "var", "export"), "var")
    prov = checkpoint.provenance(source="experiments.train (embedded default)", command=command,
                                 seed=var_info["meta"].get("seed"), commit=commit, device=device, trained=date,
                                 vqvae_metrics=vae_info["meta"].get("eval"), var_metrics=var_info["meta"].get("eval"),
                                 vqvae_steps=vae_info["meta"].get("steps"), var_steps=var_info["meta"].get("steps"))
    meta = {"name": name, "provenance": prov, "image_size": vae_info["meta"].get("image_size"),
            "dataset": var_info["meta"].get("dataset", "shapes"), **({"card": card} if card else {})}
    out = os.path.join(assets_dir, "vae_var")
    checkpoint.save(out, vae_cfg, var_cfg, {"vae": vae_params, "var": var_params}, meta=meta, overwrite=True)
    cls_dst = os.path.join(assets_dir, "classifier")
    with files.atomic_directory(cls_dst, overwrite=True) as tmp:
        shutil.copytree(os.path.join(workdir, "classifier", "export"), tmp)
    return out
