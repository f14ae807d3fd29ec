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


def ship_default(workdir: str, assets_dir: str, *, commit: str, device: str, date: str,
                 command: str = TRAIN_COMMAND) -> str:
    vae_params, vae_info = export.load(os.path.join(workdir, "vqvae", "export"), "vqvae")
    var_params, var_info = export.load(os.path.join(workdir, "var", "export"), "var")
    vae_cfg, _, _ = export.load_model(os.path.join(workdir, "vqvae", "export"), "vqvae")
    var_cfg, _, _ = export.load_model(os.path.join(workdir, "var", "export"), "var")
    prov = checkpoint.provenance(source="experiments.train (embedded default)", command=command,
                                 seed=var_info["meta"].get("seed"), commit=commit, device=device, trained=date,
                                 vqvae_metrics=vae_info["meta"].get("eval"), var_metrics=var_info["meta"].get("eval"),
                                 vqvae_steps=vae_info["meta"].get("steps"), var_steps=var_info["meta"].get("steps"))
    meta = {"name": "varq-shapes default (64 px, 10 synthetic classes)", "provenance": prov,
            "image_size": vae_info["meta"].get("image_size")}
    out = os.path.join(assets_dir, "vae_var")
    checkpoint.save(out, vae_cfg, var_cfg, {"vae": vae_params, "var": var_params}, meta=meta, overwrite=True)
    cls_dst = os.path.join(assets_dir, "classifier")
    with files.atomic_directory(cls_dst, overwrite=True) as tmp:
        shutil.copytree(os.path.join(workdir, "classifier", "export"), tmp)
    return out
