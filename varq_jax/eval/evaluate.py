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
import json
import os
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import jax
import numpy as np
from absl import logging

from varq_jax import default_model, editing, parallel, sampling
from varq_jax.checkpoint import ModelCheckpoint
from varq_jax.eval import generate as gen_lib
from varq_jax.eval import metrics
from varq_jax.eval.features import (
    FeatureNet,
    embedded_classifier_paths,
    extract_features,
    load_classifier,
    load_inception,
)
from varq_jax.eval.zero_shot import evaluate_zero_shot, load_zero_shot_inputs
from varq_jax.files import atomic_write

RESULTS = "results.json"
DTYPES = sampling.DTYPES


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
    execution: str = "simulate"          # a quantized model: simulate (fake quant) | int (integer codes and GEMMs)

    def sampling_config(self, vocab_size: int) -> sampling.SamplingConfig:
        return sampling.SamplingConfig(cfg=self.cfg, top_k=min(self.top_k, vocab_size), top_p=self.top_p)


# --- feature networks ------------------------------------------------------------------------------------------


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
    if config.classifier:
        net = load_classifier(config.classifier)
        if net.info["num_classes"] != num_classes:
            raise ValueError(f"classifier {config.classifier} has {net.info['num_classes']} classes, the model "
                             f"{num_classes}")
        res.classifier = net
    else:                                   # the embedded classifier that fits the model (default or research)
        nets = [load_classifier(p) for p in embedded_classifier_paths()]
        fitting = [n for n in nets if n.info["num_classes"] == num_classes and n.image_size in (None, image_size)]
        if fitting:
            res.classifier = fitting[0]
        elif nets:
            shipped = ", ".join(f"{n.info['num_classes']} classes at {n.image_size}px" for n in nets)
            res.notes.append(f"no embedded classifier ({shipped}) fits a {num_classes}-class {image_size}px model: "
                             f"in-project metrics are not computed (--classifier DIR)")
        else:
            res.notes.append("no trained classifier (--classifier DIR, or the embedded one once shipped): the "
                             "in-project class accuracy and classifier Fréchet distances are not computed")
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


def _real_images(dataset: str, num: int, image_size: int, chunk: int = 256) -> Iterable[np.ndarray]:
    """The test split (seed 0) of the classifier's dataset, the real data of the in-project metrics; rendered in
    fixed-size chunks (one compilation), the last one cut."""
    from varq_jax import data
    for start in range(0, num, chunk):
        images, _ = data.get(dataset).make_batch_uint8(0, np.arange(start, start + chunk), split="test",
                                                       image_size=image_size)
        yield np.asarray(images)[:num - start]


# --- metrics of a sample set -------------------------------------------------------------------------------------
PER_IMAGE = "per_image.npz"


def save_per_image(path: str, classifier_out: Dict[str, np.ndarray], labels: np.ndarray,
                   **scores: np.ndarray) -> None:
    """The classifier's view of every sample, in image order: features (float32 [N, D]), predicted class and the
    target label, with any further per-image `scores` (a zero-shot task's kept-region PSNR/SSIM) — what a paired
    bootstrap over image indices needs, written atomically."""
    atomic_write(path, lambda f: np.savez(f, features=np.asarray(classifier_out["features"], np.float32),
                                          predicted=np.asarray(classifier_out["logits"]).argmax(-1).astype(np.int32),
                                          labels=np.asarray(labels, np.int32),
                                          **{k: np.asarray(v, np.float64) for k, v in scores.items()}))


def load_per_image(path: str) -> Dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


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
        if parallel.is_main_process():      # per image, for paired bootstrap intervals (varq_jax.eval.paired)
            save_per_image(os.path.join(os.path.dirname(samples_path), PER_IMAGE), smp, labels)
        conditional = labels < num_classes
        if res.classifier.info["num_classes"] == num_classes and conditional.any():
            out["class_accuracy"] = metrics.class_accuracy(smp["logits"][conditional], labels[conditional])
        size = metrics.load_reference_batch(samples_path).image_size[0]
        num_real = config.num_real or len(labels)
        dataset = res.classifier.info["dataset"]
        real = res.features(res.classifier, (f"{dataset}-test", num_real, size),
                            _real_images(dataset, num_real, size), mesh, fb)
        out["fd_classifier_real"] = metrics.frechet_distance(smp["features"], real["features"])
        if res.ref_samples is not None:
            ref = res.features(res.classifier, stamp(res.ref_samples.path), res.ref_samples.path, mesh, fb)
            out["fd_classifier_vs_ref_samples"] = metrics.frechet_distance(smp["features"], ref["features"])
    return out


# --- zero-shot tasks ---------------------------------------------------------------------------------------------


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
    model = model or default_model.load_model(checkpoint, execution=config.execution)
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
                    "execution": getattr(model.policy, "execution", "simulate"),
                    "generated": run.generated, "reused": run.reused, "seconds": round(run.seconds, 3),
                    "devices": int(mesh.size), "processes": jax.process_count()},
        "references": {"ref_batch": config.ref_batch, "ref_samples": config.ref_samples,
                       "real": (f"{res.classifier.info['dataset']} test split, {config.num_real or num_images} images"
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
        atomic_write(os.path.join(out_dir, RESULTS), json.dumps(results, indent=1))
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


