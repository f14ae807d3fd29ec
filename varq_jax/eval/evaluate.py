"""Evaluation of a checkpoint: sharded generation, quality metrics, zero-shot editing tasks, and sweeps.

Metrics come from one of two feature networks, never from random weights:
  * Inception (weights converted by `convert_inception`): the ADM evaluator's FID, sFID, Inception Score,
    precision and recall against an ADM reference batch (its precomputed statistics when present) and/or
    against another sample set, e.g. the full-precision model's samples.npz ("FID to FP").
  * The in-project shapes classifier (an exported, trained `varq_jax.models.classifier`): class accuracy of the
    samples and the Fréchet distance of its features to real data (the shapes test split) and to another
    sample set. Used whenever a trained classifier is found, and the only metrics when no Inception is given.
Feature extraction runs data-parallel over the same mesh as generation (`parallel.map_batched`).

Zero-shot tasks (inpaint, outpaint, class-conditional edit) regenerate a box of given images through the same
sharded, resumable generator and score the kept region (PSNR, SSIM against the input) and the results' Fréchet
distance to the inputs. LPIPS is not computed (no LPIPS network in the project).
"""
import dataclasses
import functools
import json
import os
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from varq_jax import default_model, editing, parallel, sampling
from varq_jax.checkpoint import ModelCheckpoint
from varq_jax.eval import generate as gen_lib
from varq_jax.eval import metrics
from varq_jax.models.vqvae import VQVAE, VQVAEConfig

RESULTS = "results.json"
DEFAULT_CLASSIFIER = "default/classifier"       # under varq_jax/assets, beside the default model
PSNR_CAP_DB = 100.0                              # PSNR of identical regions (MSE 0) is reported as this
MIN_CLASSIFIER_TEST_ACCURACY = 0.5               # below this an exported classifier is treated as untrained
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation (the CLI flags). None/0 fields take the documented defaults."""
    num_images: int = 0                  # 0: num_per_class × num_classes
    num_per_class: int = 50
    seed: int = 0
    cfg: float = 1.5
    top_k: int = 900                     # clipped to the vocabulary size
    top_p: float = 0.96
    dtype: str = "bfloat16"
    per_device_batch: int = 16
    shard_size: int = 0                  # 0: per_device_batch
    feature_batch: int = 32              # per device, feature extraction
    model_parallel: int = 1
    grid_images: int = 64
    inception: Optional[str] = None      # converted Inception checkpoint directory
    ref_batch: Optional[str] = None      # ADM reference batch npz
    ref_samples: Optional[str] = None    # another sample set (ADM npz), e.g. the FP model's samples.npz
    classifier: Optional[str] = None     # exported classifier directory (default: the embedded one, if shipped)
    num_real: int = 0                    # real shapes images for the in-project FD (0: as many as samples)
    zero_shot: Optional[str] = None      # npz of uint8 input images for the zero-shot tasks
    tasks: Tuple[str, ...] = editing.TASKS
    box: Tuple[float, float, float, float] = (0.25, 0.25, 0.75, 0.75)
    edit_class: int = 0
    compiler_options: Tuple = ()         # (name, value) XLA options for generation (tests: fast CPU compiles)
    scan_blocks: bool = True             # False: unrolled blocks (faster generation on GPU, twice the compile time)

    def sampling_config(self, vocab_size: int) -> sampling.SamplingConfig:
        return sampling.SamplingConfig(cfg=self.cfg, top_k=min(self.top_k, vocab_size), top_p=self.top_p)


# --- feature networks ------------------------------------------------------------------------------------------
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


def default_classifier_path() -> Optional[str]:
    path = str(default_model.ASSETS / DEFAULT_CLASSIFIER)
    return path if os.path.isdir(path) else None


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
                      {"num_classes": cfg.num_classes, "test_accuracy": float(acc), "steps": int(meta["steps"])})


def extract_features(net: FeatureNet, images, mesh, per_device_batch: int) -> Dict[str, np.ndarray]:
    """Features of uint8 images (an array, an iterable of arrays, or an ADM npz path, streamed), data-parallel."""
    if isinstance(images, str):
        images = metrics.load_reference_batch(images).iter_images(per_device_batch * parallel.data_size(mesh))
    return parallel.map_batched(net.apply, net.variables, images, mesh, per_device_batch)


# --- inputs -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Resources:
    """Feature networks and reference inputs, checked once before any work; features are cached across calls
    (a sweep computes the reference features once)."""
    inception: Optional[FeatureNet] = None
    classifier: Optional[FeatureNet] = None
    ref_batch: Optional[metrics.ReferenceBatch] = None
    ref_samples: Optional[metrics.ReferenceBatch] = None
    notes: List[str] = dataclasses.field(default_factory=list)
    cache: Dict[Tuple, Dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)

    def features(self, net: FeatureNet, key: Tuple, images, mesh, per_device_batch: int) -> Dict[str, np.ndarray]:
        key = (net.kind, net.source) + key
        if key not in self.cache:
            self.cache[key] = extract_features(net, images, mesh, per_device_batch)
        return self.cache[key]


def load_resources(config: EvalConfig, image_size: int, num_classes: int) -> Resources:
    """Opens and checks every given input (clear ValueErrors before any generation)."""
    res = Resources()
    if config.ref_batch:
        res.ref_batch = metrics.load_reference_batch(config.ref_batch)
    if config.ref_samples:
        try:
            res.ref_samples = metrics.load_reference_batch(config.ref_samples)
        except ValueError as e:
            raise ValueError(f"--ref_samples: {e}") from e
    if config.ref_batch and not config.inception:
        raise ValueError("--ref_batch needs Inception weights (--inception DIR)")
    if config.inception:
        res.inception = load_inception(config.inception)
    else:
        res.notes.append("no Inception weights given (--inception): FID, sFID, IS, precision and recall are not "
                         "computed; convert pytorch-fid's weights with `python -m varq_jax.eval.convert_inception`")
    path = config.classifier or default_classifier_path()
    if path:
        net = load_classifier(path)
        if config.classifier:
            if net.info["num_classes"] != num_classes:
                raise ValueError(f"classifier {path} has {net.info['num_classes']} classes, the model {num_classes}")
            res.classifier = net
        elif net.info["num_classes"] == num_classes and net.image_size in (None, image_size):
            res.classifier = net
        else:
            res.notes.append(f"the embedded classifier ({net.info['num_classes']} shapes classes, {net.image_size}px) "
                             f"does not fit a {num_classes}-class {image_size}px model: in-project metrics are not "
                             f"computed")
    else:
        res.notes.append("no trained classifier (--classifier DIR, or the embedded one once shipped): the in-project "
                         "class accuracy and classifier Fréchet distances are not computed")
    check_sizes(res, image_size)
    return res


def check_sizes(res: Resources, image_size: int) -> None:
    """Reference sets must hold images of the samples' size (a different size is almost surely the wrong file)."""
    for flag, ref in (("--ref_batch", res.ref_batch), ("--ref_samples", res.ref_samples)):
        if ref is not None and ref.image_size != (image_size, image_size):
            raise ValueError(f"{flag} {ref.path} holds {ref.image_size[0]}x{ref.image_size[1]} images, the model "
                             f"makes {image_size}x{image_size}")
    if res.classifier is not None and res.classifier.image_size not in (None, image_size):
        raise ValueError(f"classifier {res.classifier.source} was trained on {res.classifier.image_size}px images, "
                         f"the samples are {image_size}px")


def _real_shapes_images(num: int, image_size: int, chunk: int = 256) -> Iterable[np.ndarray]:
    """The shapes test split (seed 0), the real data of the in-project metrics; rendered in fixed-size chunks
    (one compilation), the last one cut."""
    from varq_jax.data import shapes
    for start in range(0, num, chunk):
        images, _ = shapes.make_batch_uint8(0, np.arange(start, start + chunk), split="test", image_size=image_size)
        yield np.asarray(images)[:num - start]


# --- metrics of a sample set -------------------------------------------------------------------------------------
METRIC_DESCRIPTIONS = {
    "fid": "FID vs the reference batch (Inception pool)",
    "sfid": "sFID vs the reference batch (Inception spatial)",
    "inception_score": "Inception Score",
    "precision": "precision vs the reference batch (k=3)",
    "recall": "recall vs the reference batch (k=3)",
    "fid_vs_ref_samples": "FID vs the reference samples (e.g. the FP model's)",
    "sfid_vs_ref_samples": "sFID vs the reference samples",
    "precision_vs_ref_samples": "precision vs the reference samples",
    "recall_vs_ref_samples": "recall vs the reference samples",
    "class_accuracy": "classifier accuracy w.r.t. the conditioning labels",
    "fd_classifier_real": "Fréchet distance of classifier features vs real shapes images",
    "fd_classifier_vs_ref_samples": "Fréchet distance of classifier features vs the reference samples",
}


def _inception_vs(samples: Dict[str, np.ndarray], ref: Dict[str, np.ndarray],
                  ref_stats: Optional[Tuple[metrics.FeatureStats, metrics.FeatureStats]]) -> Dict[str, float]:
    if ref_stats is None or ref_stats[0] is None:
        ref_stats = (metrics.feature_stats(ref["pool"]), metrics.feature_stats(ref["spatial"]))
    precision, recall = metrics.precision_recall(ref["pool"], samples["pool"])
    return {"fid": metrics.frechet_distance(metrics.feature_stats(samples["pool"]), ref_stats[0]),
            "sfid": metrics.frechet_distance(metrics.feature_stats(samples["spatial"]), ref_stats[1]),
            "precision": precision, "recall": recall}


def sample_metrics(samples_path: str, labels: np.ndarray, num_classes: int, res: Resources, config: EvalConfig,
                   mesh) -> Dict[str, float]:
    """Every metric the given resources allow, for the ADM npz at `samples_path` (labels: its conditioning)."""
    out: Dict[str, float] = {}
    fb = config.feature_batch
    stamp = lambda p: (os.path.abspath(p), os.path.getmtime(p), os.path.getsize(p))
    if res.inception is not None:
        smp = extract_features(res.inception, samples_path, mesh, fb)
        out["inception_score"] = metrics.inception_score(smp["logits"])
        if res.ref_batch is not None:
            ref = res.features(res.inception, stamp(res.ref_batch.path), res.ref_batch.path, mesh, fb)
            stats = (res.ref_batch.pool_stats, res.ref_batch.spatial_stats)
            out.update(_inception_vs(smp, ref, stats))
        if res.ref_samples is not None:
            ref = res.features(res.inception, stamp(res.ref_samples.path), res.ref_samples.path, mesh, fb)
            out.update({f"{k}_vs_ref_samples": v for k, v in _inception_vs(smp, ref, None).items()})
    if res.classifier is not None:
        smp = extract_features(res.classifier, samples_path, mesh, fb)
        conditional = labels < num_classes
        if res.classifier.info["num_classes"] == num_classes and conditional.any():
            pred = smp["logits"].argmax(-1)
            out["class_accuracy"] = float(np.mean(pred[conditional] == labels[conditional]))
        size = metrics.load_reference_batch(samples_path).image_size[0]
        num_real = config.num_real or len(labels)
        real = res.features(res.classifier, ("shapes-test", num_real, size), _real_shapes_images(num_real, size),
                            mesh, fb)
        out["fd_classifier_real"] = metrics.frechet_distance(smp["features"], real["features"])
        if res.ref_samples is not None:
            ref = res.features(res.classifier, stamp(res.ref_samples.path), res.ref_samples.path, mesh, fb)
            out["fd_classifier_vs_ref_samples"] = metrics.frechet_distance(smp["features"], ref["features"])
    return out


# --- zero-shot tasks ---------------------------------------------------------------------------------------------
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


def load_zero_shot_inputs(path: str, model: ModelCheckpoint, config: EvalConfig) -> dict:
    """Checks and prepares the zero-shot inputs: images (arr_0 or images: uint8 [M, S, S, 3]), boxes [M, 4]
    (default: config.box for all), optional `labels` (the inputs' classes) and `target_labels` (edit targets,
    default config.edit_class), and every task's keep masks [M, pn, pn]."""
    image_size, num_classes, pn = model.vae_cfg.image_size, model.var_cfg.num_classes, model.var_cfg.patch_nums[-1]
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read zero-shot inputs {path}: {e}") from e
    images = data.get("arr_0", data.get("images"))
    if images is None:
        raise ValueError(f"zero-shot inputs {path} have no images (arr_0 or images); keys: {sorted(data)}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"zero-shot images must be uint8 [M, H, W, 3], got {images.dtype} {images.shape}")
    if images.shape[1:3] != (image_size, image_size):
        raise ValueError(f"zero-shot images are {images.shape[1]}x{images.shape[2]}, the model makes "
                         f"{image_size}x{image_size}")
    m = len(images)
    boxes = np.asarray(data.get("boxes", np.tile(np.asarray(config.box, np.float64), (m, 1))), np.float64)
    if boxes.shape != (m, 4):
        raise ValueError(f"boxes must be [{m}, 4] (y0, x0, y1, x1 fractions), got {boxes.shape}")
    if not 0 <= config.edit_class < num_classes:
        raise ValueError(f"edit_class must be in [0, {num_classes}), got {config.edit_class}")
    out = {"images": images, "boxes": boxes, "target_labels": np.full(m, config.edit_class, np.int32),
           "sha256": gen_lib.sha256_arrays([images])}
    for key in ("labels", "target_labels"):
        if key in data:
            lab = np.asarray(data[key])
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


def evaluate_zero_shot(model: ModelCheckpoint, out_dir: str, config: EvalConfig, res: Resources, mesh,
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
            shard_size=config.shard_size or None, dtype=DTYPES[config.dtype],
            conditioning=gen_lib.Conditioning(tuple(tokens), keep), grid_images=config.grid_images,
            compiler_options=dict(config.compiler_options), scan_blocks=config.scan_blocks, log=log)
        out, _ = gen_lib.load_samples(run.samples_path)
        kept = np.repeat(np.repeat(keep, up, axis=1), up, axis=2)
        r = {"psnr_kept": float(np.nanmean(masked_psnr(out, images, kept))),
             "ssim_kept": float(np.nanmean(masked_ssim(out, images, kept))), "num_images": m}
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
                r["class_accuracy"] = float(np.mean(f_out["logits"].argmax(-1) == target))
        results[task] = r
    return results


# --- one checkpoint -----------------------------------------------------------------------------------------------
def _quant_summary(model: ModelCheckpoint) -> Optional[dict]:
    policy = model.policy
    if policy is None:
        return None
    return {"w_bits": policy.w_bits, "a_bits": policy.a_bits, "shift_and_sum": policy.shift_and_sum,
            "rules": [r.to_dict() for r in policy.rules]}       # per-module rules before the shorthands


def evaluate(checkpoint: Optional[str], out_dir: str, config: EvalConfig, *, mesh=None,
             resources: Optional[Resources] = None, model: Optional[ModelCheckpoint] = None,
             log: Callable[[str], None] = logging.info) -> dict:
    """Generates (or resumes) the sample set of `checkpoint` (None: the embedded default) in out_dir, scores it,
    runs the zero-shot tasks if configured, and writes out_dir/results.json. Returns the results."""
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
    mesh = mesh or parallel.make_mesh(config.model_parallel)
    model = model or default_model.load_model(checkpoint)
    vcfg = model.var_cfg
    num_images = config.num_images or config.num_per_class * vcfg.num_classes
    labels = gen_lib.class_labels(num_images, vcfg.num_classes)
    settings = config.sampling_config(vcfg.vocab_size)
    sampling.validate(settings, vcfg, labels)
    if resources is None:
        res = load_resources(config, model.vae_cfg.image_size, vcfg.num_classes)
    else:
        res = resources
        check_sizes(res, model.vae_cfg.image_size)
    zs_inputs = load_zero_shot_inputs(config.zero_shot, model, config) if config.zero_shot else None
    notes = list(res.notes)
    if model.meta.get("random_weights"):
        notes.insert(0, "the model is RANDOM-WEIGHT (no trained default is shipped): its scores say nothing about "
                        "generation quality")
    if res.classifier is not None:
        notes.append(f"classifier {res.classifier.source}: test accuracy {res.classifier.info['test_accuracy']:.4f}")
    log(default_model.describe(model))

    run = gen_lib.generate_samples(model, out_dir, labels=labels, seed=config.seed, settings=settings, mesh=mesh,
                                   per_device_batch=config.per_device_batch, shard_size=config.shard_size or None,
                                   dtype=DTYPES[config.dtype], grid_images=config.grid_images,
                                   compiler_options=dict(config.compiler_options), scan_blocks=config.scan_blocks,
                                   log=log)
    scores = sample_metrics(run.samples_path, labels, vcfg.num_classes, res, config, mesh)
    results = {
        "checkpoint": checkpoint or "default",
        "model": default_model.describe(model),
        "random_weights": bool(model.meta.get("random_weights", False)),
        "quantization": _quant_summary(model),
        "samples": {"path": run.samples_path, "grid": run.grid_path, "num_images": run.num_images,
                    "seed": config.seed, "sampling": dataclasses.asdict(settings), "dtype": config.dtype,
                    "generated": run.generated, "reused": run.reused, "seconds": round(run.seconds, 3),
                    "devices": int(mesh.size), "processes": jax.process_count()},
        "references": {"ref_batch": config.ref_batch, "ref_samples": config.ref_samples,
                       "real": (f"shapes test split, {config.num_real or num_images} images"
                                if res.classifier is not None else None),
                       "inception": config.inception, "classifier": res.classifier.source if res.classifier else None},
        "metrics": scores,
        "notes": notes,
    }
    if zs_inputs is not None:
        results["zero_shot"] = evaluate_zero_shot(model, os.path.join(out_dir, "zero_shot"), config, res, mesh,
                                                  zs_inputs, log)
        results["notes"].append("zero-shot: LPIPS is not computed (no LPIPS network in the project)")
    if parallel.is_main_process():
        gen_lib.atomic_write(os.path.join(out_dir, RESULTS), lambda f: f.write(json.dumps(results, indent=1).encode()))
    return results


def metric_lines(results: dict) -> List[str]:
    """One line per metric (and per note), for the log and the terminal."""
    lines = [f"NOTE: {n}" for n in results.get("notes", [])]
    for name, value in results.get("metrics", {}).items():
        lines.append(f"{name}: {value:.6g}    ({METRIC_DESCRIPTIONS.get(name, name)})")
    for task, scores in results.get("zero_shot", {}).items():
        for name, value in scores.items():
            lines.append(f"zero_shot/{task}/{name}: {value:.6g}")
    return lines


# --- sweeps -----------------------------------------------------------------------------------------------------
def _sweep_row(results: dict) -> dict:
    row = {"checkpoint": results["checkpoint"], "quantization": results["quantization"],
           "random_weights": results["random_weights"], "num_images": results["samples"]["num_images"],
           **results["metrics"]}
    for task, scores in results.get("zero_shot", {}).items():
        row.update({f"{task}/{k}": v for k, v in scores.items() if k != "num_images"})
    return row


def sweep_markdown(rows: Sequence[dict]) -> str:
    cols = ["checkpoint", "quantization", "random_weights", "num_images"]
    cols += sorted({k for r in rows for k in r} - set(cols), key=lambda k: (k not in METRIC_DESCRIPTIONS, k))

    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, dict):
            return f"W{v['w_bits']}A{v['a_bits']}{' SaS' if v.get('shift_and_sum') else ''}"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def sweep(checkpoints: Sequence[Optional[str]], out_dir: str, config: EvalConfig, *, fid_to_first: bool = False,
          mesh=None, log: Callable[[str], None] = logging.info) -> List[dict]:
    """Evaluates each checkpoint (None: the embedded default) into out_dir/NN_name/ and writes one table,
    out_dir/sweep.md and sweep.json. `fid_to_first`: the first checkpoint's samples are every later one's
    --ref_samples (e.g. FP first: FID to FP). Reference features are computed once."""
    if not checkpoints:
        raise ValueError("no checkpoints to sweep")
    for c in checkpoints:
        if c is not None and not os.path.isdir(c):
            raise ValueError(f"checkpoint directory {c!r} does not exist")
    mesh = mesh or parallel.make_mesh(config.model_parallel)
    first_model = default_model.load_model(checkpoints[0])
    res = load_resources(config, first_model.vae_cfg.image_size, first_model.var_cfg.num_classes)
    rows = []
    for i, ckpt in enumerate(checkpoints):
        name = f"{i:02d}_{os.path.basename(os.path.normpath(ckpt)) if ckpt else 'default'}"
        cfg_i = config
        if fid_to_first and i > 0:
            cfg_i = dataclasses.replace(config, ref_samples=rows[0]["samples_path"])
            res.ref_samples = metrics.load_reference_batch(cfg_i.ref_samples)
        log(f"sweep {i + 1}/{len(checkpoints)}: {ckpt or 'default'}")
        results = evaluate(ckpt, os.path.join(out_dir, name), cfg_i, mesh=mesh, resources=res,
                           model=first_model if i == 0 else None, log=log)
        rows.append({**_sweep_row(results), "samples_path": results["samples"]["path"]})
    table = [{k: v for k, v in r.items() if k != "samples_path"} for r in rows]
    if parallel.is_main_process():
        gen_lib.atomic_write(os.path.join(out_dir, "sweep.json"),
                              lambda f: f.write(json.dumps(table, indent=1).encode()))
        gen_lib.atomic_write(os.path.join(out_dir, "sweep.md"), lambda f: f.write(sweep_markdown(table).encode()))
    return table
