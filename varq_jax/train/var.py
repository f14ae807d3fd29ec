"""Stage 2: the VAR transformer on the frozen (exported) VQVAE's tokens of freshly rendered shapes.

Teacher-forced cross-entropy over all L tokens (mean, uniform token weights, no label smoothing, as the
official trainer's defaults), class labels replaced by the null class `num_classes` with probability
cond_drop_rate (for classifier-free guidance), AdamW with warm-up + cosine and global-norm clipping. The
initialisation follows the official `init_weights` (see `init_params`). Tokens come from the exported VQVAE
(bf16 kernels), i.e. exactly the tokenizer that ships with the model.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varq_jax import data
from varq_jax.models.var import VAR, VARConfig
from varq_jax.models.vqvae import VQVAE
from varq_jax.train import export, loop, optim
from varq_jax.train import vqvae as vqvae_stage

STAGE = "var"


def model_config(config) -> VARConfig:
    m = config.var.model
    if m.width % m.heads:
        raise ValueError(f"VAR width {m.width} is not divisible by heads {m.heads}")
    return VARConfig(depth=m.depth, width=m.width, heads=m.heads, mlp_ratio=m.mlp_ratio,
                     num_classes=data.of_config(config).NUM_CLASSES, vocab_size=config.vocab_size, cvae=config.cvae,
                     patch_nums=tuple(config.patch_nums), attn_l2_norm=m.attn_l2_norm, shared_aln=m.shared_aln,
                     cond_drop_rate=config.var.cond_drop_rate)


def _rescale(params, path_test, factor_fn):
    def visit(path, leaf):
        names = tuple(str(getattr(k, "key", k)) for k in path)
        return factor_fn(names, leaf) if path_test(names) else leaf
    return jax.tree_util.tree_map_with_path(visit, params)


def init_params(cfg: VARConfig, key, init) -> dict:
    """Flax init, then the official scheme: every Linear kernel N(0, 1/(3C)) (torch's trunc_normal_ bounds ±2
    are ≫ std here, so plain normal), biases 0; head ×init.head; head_nm ×init.adaln; attn proj and fc2
    ÷√(2·depth); per-block AdaLN columns γ₁γ₂ ×init.adaln_gamma, the other four ×init.adaln."""
    k_init, k_kernel = jax.random.split(key)
    x = jnp.zeros((1, cfg.L - cfg.patch_nums[0] ** 2, cfg.cvae), jnp.float32)
    params = VAR(cfg).init(k_init, jnp.zeros((1,), jnp.int32), x)["params"]
    std = math.sqrt(1 / cfg.width / 3)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = iter(jax.random.split(k_kernel, len(leaves)))
    new = []
    for path, leaf in leaves:
        names = tuple(str(getattr(k, "key", k)) for k in path)
        k = next(keys)
        if names[-1] == "kernel":
            leaf = std * jax.random.normal(k, leaf.shape, leaf.dtype)
            if "head" in names:
                leaf = leaf * init.head
            elif "head_nm" in names:
                leaf = leaf * init.adaln
            elif names[-2] in ("proj", "fc2"):
                leaf = leaf / math.sqrt(2 * cfg.depth)
            elif names[-2] in ("ada_lin", "shared_ada_lin"):
                c = cfg.width
                col = jnp.arange(leaf.shape[1])
                leaf = leaf * jnp.where(col < 2 * c, init.adaln_gamma, init.adaln)
        elif names[-1] == "bias":
            leaf = jnp.zeros_like(leaf)
        elif names[-1] == "ada_gss":
            row = jnp.arange(6)[:, None]
            leaf = leaf * jnp.where(row < 2, init.adaln_gamma, init.adaln)
        new.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, new)


def load_tokenizer(config, workdir: str):
    """(VQVAE module, float32 params) of the exported stage-1 model; checks it matches this config."""
    path = os.path.join(workdir, vqvae_stage.STAGE, "export")
    stored_cfg, params, _ = export.load_model(path, vqvae_stage.STAGE)
    cfg = vqvae_stage.model_config(config)
    if stored_cfg != cfg:
        raise ValueError(f"the VQVAE exported in {path} has config {stored_cfg}, which differs from this run's {cfg}")
    return VQVAE(cfg, jnp.dtype(config.var.tokenizer_dtype)), params


def tokens(vae: VQVAE, vae_params, images):
    """images → (targets [B, L] int32, teacher-forcing input [B, L − pn₀², Cvae])."""
    idx_list = vae.apply({"params": vae_params}, images, method=VQVAE.img_to_idx)
    x_in = vae.apply({"params": vae_params}, idx_list, method=VQVAE.idx_to_var_input)
    return jnp.concatenate(idx_list, axis=1), x_in


def cross_entropy(logits, targets):
    """(mean CE, token accuracy, CE of the last scale's tokens) — logits [B, L, V] float32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    acc = jnp.mean(logits.argmax(-1) == targets)
    return ce.mean(), acc, ce


def init_state(config, cfg: VARConfig, tx) -> loop.TrainState:
    params = init_params(cfg, jax.random.fold_in(jax.random.key(config.seed), 3), config.var.init)
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extra={})


def make_train_step(config, cfg: VARConfig, vae: VQVAE, vae_params, tx):
    tc = config.var
    model = VAR(cfg, jnp.dtype(tc.compute_dtype))
    base_key = jax.random.fold_in(jax.random.key(config.seed), 4)
    dataset = data.of_config(config)
    last = cfg.patch_nums[-1] ** 2

    def loss_fn(params, labels, x_in, targets):
        logits = model.apply({"params": params}, labels, x_in)
        loss, acc, ce = cross_entropy(logits, targets)
        return loss, (acc, ce[:, -last:].mean())

    def train_step(state: loop.TrainState, vae_params):
        indices = dataset.batch_indices(state.step, tc.batch_size, config.train_images)
        images, labels = dataset.make_batch(config.seed, indices, image_size=config.image_size)
        targets, x_in = tokens(vae, vae_params, images)
        drop = jax.random.uniform(jax.random.fold_in(base_key, state.step), labels.shape) < cfg.cond_drop_rate
        labels = jnp.where(drop, cfg.num_classes, labels)
        (loss, (acc, tail)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, labels, x_in,
                                                                                targets)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "acc": acc, "loss_last_scale": tail, "grad_norm": optim.global_norm(grads)}
        return loop.TrainState(state.step + 1, params, opt_state, {}), metrics

    # the tokenizer's params are an argument, not closed-over constants baked into the compiled program
    compiled = loop.jit(train_step, config)
    return lambda state: compiled(state, vae_params)


def evaluate(config, cfg: VARConfig, params, vae: VQVAE, vae_params, num_images: int) -> dict:
    """Teacher-forced CE and token accuracy on the test split (true labels), overall and per scale."""
    model = VAR(cfg, jnp.dtype(config.var.compute_dtype))
    batch = min(num_images, config.var.batch_size)
    dataset = data.of_config(config)

    def run(params, vae_params, start):
        images, labels = dataset.make_batch(config.seed, start + jnp.arange(batch, dtype=jnp.int32),
                                            split="test", image_size=config.image_size)
        targets, x_in = tokens(vae, vae_params, images)
        logits = model.apply({"params": params}, labels, x_in)
        _, _, ce = cross_entropy(logits, targets)
        correct = (logits.argmax(-1) == targets).astype(jnp.float32)
        return ce.mean(0), correct.mean(0)

    ce, acc = [], []
    run = loop.jit(run, config)
    for start in range(0, num_images - batch + 1, batch):
        c, a = run(params, vae_params, start)
        ce.append(np.asarray(c))
        acc.append(np.asarray(a))
    n_batches = len(ce)
    ce, acc = np.mean(ce, 0), np.mean(acc, 0)
    per_scale = [(float(ce[b:e].mean()), float(acc[b:e].mean())) for b, e in cfg.begin_ends]
    return {"ce": float(ce.mean()), "acc": float(acc.mean()), "ce_per_scale": [c for c, _ in per_scale],
            "acc_per_scale": [a for _, a in per_scale], "eval_images": n_batches * batch}


def train_and_export(config, workdir: str) -> str:
    """Trains (resuming from workdir/var/ckpt) on workdir/vqvae/export's tokens; writes workdir/var/export."""
    tc = config.var
    cfg = model_config(config)
    vae, vae_params = load_tokenizer(config, workdir)
    tx = optim.make_optimizer(tc.optim, tc.num_steps)
    state = loop.run_stage(config, workdir, STAGE, tc, lambda: init_state(config, cfg, tx),
                           make_train_step(config, cfg, vae, vae_params, tx))
    if state is None:
        return ""
    shipped = export.cast_kernels(state.params)
    metrics = {}
    if tc.eval_images > 0:
        metrics = evaluate(config, cfg, export.as_float32(shipped), vae, vae_params, tc.eval_images)
    meta = {"steps": int(state.step), "seed": config.seed, "image_size": config.image_size,
            "dataset": config.get("dataset", data.DEFAULT),
            "train_images": config.train_images, "compute_dtype": tc.compute_dtype, "eval": metrics}
    return export.save(os.path.join(workdir, STAGE, "export"), shipped, kind=STAGE, config=cfg, meta=meta)
