"""Stage 3: the dataset's classifier (the feature network of the quality metrics), cross-entropy on fresh images."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varq_jax import data
from varq_jax.models import classifier as clf
from varq_jax.train import export, loop, optim

STAGE = "classifier"


def model_config(config) -> clf.ClassifierConfig:
    m = config.classifier.model
    return clf.ClassifierConfig(num_classes=data.of_config(config).NUM_CLASSES, widths=tuple(m.widths),
                                feature_dim=m.feature_dim, groups=m.groups)


def init_state(config, cfg: clf.ClassifierConfig, tx) -> loop.TrainState:
    params = clf.init_params(cfg, jax.random.fold_in(jax.random.key(config.seed), 5), config.image_size)
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extra={})


def make_train_step(config, cfg: clf.ClassifierConfig, tx):
    tc = config.classifier
    model = clf.Classifier(cfg, jnp.dtype(tc.compute_dtype))
    dataset = data.of_config(config)

    def loss_fn(params, images, labels):
        logits, _ = model.apply({"params": params}, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, jnp.mean(logits.argmax(-1) == labels)

    def train_step(state: loop.TrainState):
        indices = dataset.batch_indices(state.step, tc.batch_size, config.train_images)
        images, labels = dataset.make_batch(config.seed, indices, image_size=config.image_size)
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, images, labels)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "acc": acc, "grad_norm": optim.global_norm(grads)}
        return loop.TrainState(state.step + 1, params, opt_state, {}), metrics

    return loop.jit(train_step, config)


def evaluate(config, cfg: clf.ClassifierConfig, params, num_images: int) -> dict:
    """Test-split accuracy, overall and per class, computed in float32 like the metrics."""
    model = clf.Classifier(cfg)
    batch = min(num_images, config.classifier.batch_size)
    dataset = data.of_config(config)

    def run(params, start):
        images, labels = dataset.make_batch(config.seed, start + jnp.arange(batch, dtype=jnp.int32),
                                            split="test", image_size=config.image_size)
        logits, _ = model.apply({"params": params}, images)
        return logits.argmax(-1), labels

    run = loop.jit(run, config)
    pred, labels = zip(*(jax.device_get(run(params, s)) for s in range(0, num_images - batch + 1, batch)))
    pred, labels = np.concatenate(pred), np.concatenate(labels)
    per_class = [float(np.mean(pred[labels == k] == k)) if np.any(labels == k) else None
                 for k in range(cfg.num_classes)]
    return {"acc": float(np.mean(pred == labels)), "acc_per_class": per_class, "eval_images": len(labels)}


def train_and_export(config, workdir: str) -> str:
    """Trains (resuming from workdir/classifier/ckpt) and writes workdir/classifier/export."""
    tc = config.classifier
    cfg = model_config(config)
    tx = optim.make_optimizer(tc.optim, tc.num_steps)
    state = loop.run_stage(config, workdir, STAGE, tc, lambda: init_state(config, cfg, tx),
                           make_train_step(config, cfg, tx))
    if state is None:
        return ""
    shipped = export.cast_kernels(state.params)
    metrics = evaluate(config, cfg, export.as_float32(shipped), tc.eval_images) if tc.eval_images else {}
    meta = {"steps": int(state.step), "seed": config.seed, "image_size": config.image_size,
            "dataset": config.get("dataset", data.DEFAULT),
            "train_images": config.train_images, "compute_dtype": tc.compute_dtype, "eval": metrics}
    return export.save(os.path.join(workdir, STAGE, "export"), shipped, kind=STAGE, config=cfg, meta=meta)
