"""Zero-shot tasks (inpaint, outpaint, class-conditional edit): a box of given images regenerated through the
sharded, resumable generator; the kept region scored by PSNR and SSIM against the input, the results by their
Frechet distance to the inputs. LPIPS is not computed (no LPIPS network in the project).
"""
import functools
import os
import zipfile
from typing import (
    TYPE_CHECKING,
    Callable,
    Dict,
    Optional,
)

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from varq_jax import editing, fingerprint, parallel, sampling
from varq_jax.checkpoint import ModelCheckpoint
from varq_jax.eval import generate as gen_lib
from varq_jax.eval import metrics
from varq_jax.eval.features import extract_features
from varq_jax.models.vqvae import VQVAE, VQVAEConfig

if TYPE_CHECKING:
    from varq_jax.eval.evaluate import EvalConfig, Resources

PSNR_CAP_DB = 100.0                              # PSNR of identical regions (MSE 0) is reported as this


def _ssim_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - (size - 1) / 2
    w = np.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def _valid_filter_matrix(n: int, window: np.ndarray) -> np.ndarray:
    m = np.zeros((n - len(window) + 1, n), np.float64)
    for i in range(m.shape[0]):
        m[i, i:i + len(window)] = window
    return m


@jax.jit
def _ssim_map(a: jax.Array, b: jax.Array) -> jax.Array:
    """SSIM map of uint8 [N, H, W, C] pairs (Wang et al. 2004: 11-tap Gaussian σ 1.5, K = 0.01, 0.03, L = 255),
    [N, H, W, C]: the images are mirrored at the border (scipy 'reflect') so that every pixel has a value."""
    win = _ssim_window()
    mh = jnp.asarray(_valid_filter_matrix(a.shape[1] + 10, win), jnp.float32)
    mw = jnp.asarray(_valid_filter_matrix(a.shape[2] + 10, win), jnp.float32)
    filt = lambda x: jnp.einsum("pw,nowc->nopc", mw, jnp.einsum("oh,nhwc->nowc", mh, x, precision="highest"),
                                precision="highest")
    pad = lambda x: jnp.pad(x.astype(jnp.float32), ((0, 0), (5, 5), (5, 5), (0, 0)), mode="symmetric")
    x, y = pad(a), pad(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def masked_ssim(a, b, mask) -> np.ndarray:
    """Per-image mean SSIM over the pixels where mask [N, H, W] is 1 (the SSIM map at those window centres,
    averaged over channels). Pixels within 5 px of the regenerated region see it through their window."""
    a, b, mask = np.asarray(a), np.asarray(b), np.asarray(mask, np.float64)
    if a.shape != b.shape or a.ndim != 4 or mask.shape != a.shape[:3]:
        raise ValueError(f"masked_ssim: images {a.shape} / {b.shape} and mask {mask.shape} do not match")
    if min(a.shape[1:3]) < 6:
        raise ValueError(f"SSIM needs images of at least 6x6 pixels (mirrored 11-px window), got "
                         f"{a.shape[1]}x{a.shape[2]}")
    smap = np.asarray(_ssim_map(jnp.asarray(a), jnp.asarray(b)), np.float64).mean(-1)
    count = mask.sum(axis=(1, 2))
    return np.where(count > 0, (smap * mask).sum(axis=(1, 2)) / np.maximum(count, 1), np.nan)


def masked_psnr(a, b, mask) -> np.ndarray:
    """Per-image PSNR (dB, peak 255) over the pixels where mask [N, H, W] is 1; identical regions give the cap."""
    a, b, mask = np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(mask, np.float64)
    if a.shape != b.shape or a.ndim != 4 or mask.shape != a.shape[:3]:
        raise ValueError(f"masked_psnr: images {a.shape} / {b.shape} and mask {mask.shape} do not match")
    count = mask.sum(axis=(1, 2)) * a.shape[-1]
    mse = (np.square(a - b) * mask[..., None]).sum(axis=(1, 2, 3)) / np.maximum(count, 1)
    with np.errstate(divide="ignore"):
        psnr = np.minimum(10 * np.log10(255.0 ** 2 / mse), PSNR_CAP_DB)
    return np.where(count > 0, psnr, np.nan)


def load_zero_shot_inputs(path: str, model: ModelCheckpoint, config: "EvalConfig") -> dict:
    """The zero-shot inputs of an npz: images (arr_0 or images: uint8 [M, S, S, 3]), boxes [M, 4] (default:
    config.box for all), optional `labels` (the inputs' classes) and `target_labels` (edit targets, default
    config.edit_class), checked and prepared by `prepare_inputs`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read zero-shot inputs {path}: {e}") from e
    images = data.get("arr_0", data.get("images"))
    if images is None:
        raise ValueError(f"zero-shot inputs {path} have no images (arr_0 or images); keys: {sorted(data)}")
    return prepare_inputs(images, model, config, data.get("boxes"), data.get("labels"), data.get("target_labels"))


def prepare_inputs(images, model: ModelCheckpoint, config: "EvalConfig", boxes=None, labels=None,
                   target_labels=None) -> dict:
    """Checked zero-shot inputs with every task's keep masks [M, pn, pn]: images, boxes, labels (if given),
    target_labels (default config.edit_class), the images' sha256."""
    image_size, num_classes, pn = model.vae_cfg.image_size, model.var_cfg.num_classes, model.var_cfg.patch_nums[-1]
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"zero-shot images must be uint8 [M, H, W, 3], got {images.dtype} {images.shape}")
    if images.shape[1:3] != (image_size, image_size):
        raise ValueError(f"zero-shot images are {images.shape[1]}x{images.shape[2]}, the model makes "
                         f"{image_size}x{image_size}")
    m = len(images)
    boxes = np.asarray(np.tile(np.asarray(config.box, np.float64), (m, 1)) if boxes is None else boxes, np.float64)
    if boxes.shape != (m, 4):
        raise ValueError(f"boxes must be [{m}, 4] (y0, x0, y1, x1 fractions), got {boxes.shape}")
    if not 0 <= config.edit_class < num_classes:
        raise ValueError(f"edit_class must be in [0, {num_classes}), got {config.edit_class}")
    out = {"images": images, "boxes": boxes, "target_labels": np.full(m, config.edit_class, np.int32),
           "sha256": fingerprint.array_digest(images)}
    for key, lab in (("labels", labels), ("target_labels", target_labels)):
        if lab is not None:
            lab = np.asarray(lab)
            if (lab.shape != (m,) or not np.issubdtype(lab.dtype, np.integer) or lab.min() < 0
                    or lab.max() >= num_classes):
                raise ValueError(f"{key} must be {m} integers in [0, {num_classes}), got {lab.dtype} {lab.shape}")
            out[key] = lab.astype(np.int32)
    for task in config.tasks:
        if task not in editing.TASKS:
            raise ValueError(f"unknown zero-shot task {task!r}; valid tasks: {', '.join(editing.TASKS)}")
    out["keep"] = {task: np.stack([editing.box_keep_mask(pn, box, task) for box in boxes]) for task in config.tasks}
    return out


@functools.lru_cache(maxsize=None)
def _encode_fn(vae_cfg: VQVAEConfig) -> Callable:
    def encode(vae_params, images):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        idx = VQVAE(vae_cfg).apply({"params": vae_params}, x, method=VQVAE.img_to_idx)
        return [t.reshape(t.shape[0], -1).astype(jnp.int32) for t in idx]
    return encode


def evaluate_zero_shot(model: ModelCheckpoint, out_dir: str, config: "EvalConfig", res: "Resources", mesh,
                       inputs: Optional[dict] = None, log: Callable[[str], None] = logging.info) -> Dict[str, Dict]:
    """Each task in `config.tasks` on the inputs of `config.zero_shot`: results under out_dir/<task>/ and per task
    {psnr_kept, ssim_kept, fd_*_vs_inputs, fid_vs_inputs, class_accuracy}."""
    vae_cfg, var_cfg = model.vae_cfg, model.var_cfg
    inputs = inputs or load_zero_shot_inputs(config.zero_shot, model, config)
    images, m, pn = inputs["images"], len(inputs["images"]), var_cfg.patch_nums[-1]
    tokens = parallel.map_batched(_encode_fn(vae_cfg), model.params["vae"], images, mesh, config.per_device_batch)
    fb, up = config.feature_batch, vae_cfg.image_size // pn
    results = {}
    for task in config.tasks:
        keep = inputs["keep"][task]
        if task == "edit":
            labels = inputs["target_labels"]
        else:
            labels = np.full(m, var_cfg.num_classes, np.int32)   # the null class, as the official inpainting demo
        run = gen_lib.generate_samples(
            model, os.path.join(out_dir, task), labels=labels, seed=config.seed,
            settings=config.sampling_config(var_cfg.vocab_size), mesh=mesh, per_device_batch=config.per_device_batch,
            shard_size=config.shard_size or None, dtype=sampling.DTYPES[config.dtype],
            conditioning=gen_lib.Conditioning(tuple(tokens), keep), grid_images=config.grid_images,
            compiler_options=dict(config.compiler_options), scan_blocks=config.scan_blocks, log=log)
        out, _ = gen_lib.load_samples(run.samples_path)
        kept = np.repeat(np.repeat(keep, up, axis=1), up, axis=2)
        psnr, ssim = masked_psnr(out, images, kept), masked_ssim(out, images, kept)
        r = {"psnr_kept": float(np.nanmean(psnr)), "ssim_kept": float(np.nanmean(ssim)), "num_images": m}
        stamp = ("zero-shot-inputs", inputs["sha256"])
        if res.inception is not None:
            f_out = extract_features(res.inception, out, mesh, fb)
            f_in = res.features(res.inception, stamp, images, mesh, fb)
            r["fid_vs_inputs"] = metrics.frechet_distance(f_out["pool"], f_in["pool"])
        if res.classifier is not None:
            f_out = extract_features(res.classifier, out, mesh, fb)
            f_in = res.features(res.classifier, stamp, images, mesh, fb)
            r["fd_classifier_vs_inputs"] = metrics.frechet_distance(f_out["features"], f_in["features"])
            target = labels if task == "edit" else inputs.get("labels")
            if target is not None and res.classifier.info["num_classes"] == var_cfg.num_classes:
                r["class_accuracy"] = metrics.class_accuracy(f_out["logits"], target)
                if parallel.is_main_process():           # per image, for paired intervals (runs.zero_shot_rows)
                    from varq_jax.eval.evaluate import PER_IMAGE, save_per_image
                    save_per_image(os.path.join(out_dir, task, PER_IMAGE), f_out, target, psnr_kept=psnr,
                                   ssim_kept=ssim)
        results[task] = r
    return results
