"""Stage 1: the multi-scale VQVAE on freshly rendered shapes.

Loss = l1·|x̂ − x| + l2·(x̂ − x)² on the unclipped decoder output + vq·(the quantizer's own loss, see
`VQVAE.quantize_train`); no perceptual or adversarial term (the official VAE's training losses are not
public). Dead codes: every code keeps an EMA of the fraction of tokens (all scales pooled) that hit it; every
`dead_code.every` steps until `dead_code.until`·num_steps, each code whose EMA is below
`dead_code.threshold`/V is re-initialised to a quantizer input of the current batch chosen at random (any
scale), and its EMA is reset to 1/V so it gets time to be used. The EMA starts at 0, so step 0 initialises the
whole codebook from encoder outputs (the default init is a near-constant codebook).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from varq_jax import data
from varq_jax.models.vqvae import VQVAE, VQVAEConfig
from varq_jax.train import export, loop, optim

STAGE = "vqvae"


def model_config(config) -> VQVAEConfig:
    m = config.vqvae.model
    cfg = VQVAEConfig(vocab_size=config.vocab_size, z_channels=config.cvae, ch=m.ch, ch_mult=tuple(m.ch_mult),
                      num_res_blocks=m.num_res_blocks, in_channels=3, patch_nums=tuple(config.patch_nums),
                      share_quant_resi=m.share_quant_resi, quant_resi=m.quant_resi, beta=m.beta,
                      using_sa=m.using_sa, using_mid_sa=m.using_mid_sa)
    if cfg.image_size != config.image_size:
        raise ValueError(f"VQVAE maps {cfg.image_size}-px images (last patch_num {cfg.patch_nums[-1]} × "
                         f"downsample {cfg.downsample}) but config.image_size is {config.image_size}")
    bad = [cfg.ch * k for k in cfg.ch_mult if (cfg.ch * k) % 32]
    if bad:
        raise ValueError(f"VQVAE channel counts {bad} are not divisible by GroupNorm's 32 groups")
    return cfg


def _train_forward(m: VQVAE, images):
    f_hat, vq_loss, idx_list, inputs = m.quantize_train(m.encode(images))
    recon = m.decoder(m.post_quant_conv(f_hat)).astype(jnp.float32)
    return recon, vq_loss, idx_list, inputs


def code_hits(idx_list, vocab_size: int) -> jax.Array:
    """[V] fraction of all tokens (every scale) that chose each code."""
    idx = jnp.concatenate([i.reshape(-1) for i in idx_list])
    return jnp.bincount(idx, length=vocab_size).astype(jnp.float32) / idx.size


def reinit_dead_codes(embedding, usage, inputs, key, threshold: float):
    """Codes with usage < threshold/V take random rows of `inputs` [N, C]; returns (embedding, usage, count)."""
    vocab_size = embedding.shape[0]
    dead = usage < threshold / vocab_size
    pick = jax.random.randint(key, (vocab_size,), 0, inputs.shape[0])
    embedding = jnp.where(dead[:, None], inputs[pick], embedding)
    usage = jnp.where(dead, 1.0 / vocab_size, usage)
    return embedding, usage, dead.sum()


def init_state(config, model: VQVAE, tx) -> loop.TrainState:
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    img = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    params = model.init(key, img)["params"]
    usage = jnp.zeros((model.cfg.vocab_size,), jnp.float32)
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           extra={"usage": usage})


def make_train_step(config, model: VQVAE, tx):
    tc, vocab = config.vqvae, model.cfg.vocab_size
    dead_cfg = tc.dead_code
    dead_until = int(dead_cfg.until * tc.num_steps)
    base_key = jax.random.fold_in(jax.random.key(config.seed), 2)
    dataset = data.of_config(config)

    def loss_fn(params, images):
        recon, vq_loss, idx_list, inputs = model.apply({"params": params}, images, method=_train_forward)
        l1 = jnp.mean(jnp.abs(recon - images))
        l2 = jnp.mean(jnp.square(recon - images))
        total = tc.l1_weight * l1 + tc.l2_weight * l2 + tc.vq_weight * vq_loss
        return total, (l1, l2, vq_loss, idx_list, inputs)

    def train_step(state: loop.TrainState):
        indices = dataset.batch_indices(state.step, tc.batch_size, config.train_images)
        images, _ = dataset.make_batch(config.seed, indices, image_size=config.image_size)
        (loss, (l1, l2, vq_loss, idx_list, inputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, images)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # dead = unused through the previous step (the EMA starts at 0, so step 0 re-initialises every code)
        hits = code_hits(idx_list, vocab)
        flat_inputs = jnp.concatenate([z.reshape(-1, z.shape[-1]) for z in inputs])
        new_emb, reset_usage, n_dead = reinit_dead_codes(params["embedding"], state.extra["usage"], flat_inputs,
                                                         jax.random.fold_in(base_key, state.step),
                                                         dead_cfg.threshold)
        do_reinit = (state.step % dead_cfg.every == 0) & (state.step < dead_until)
        params = {**params, "embedding": jnp.where(do_reinit, new_emb, params["embedding"])}
        usage = jnp.where(do_reinit, reset_usage, state.extra["usage"])
        usage = dead_cfg.decay * usage + (1 - dead_cfg.decay) * hits

        metrics = {"loss": loss, "l1": l1, "l2": l2, "vq": vq_loss, "grad_norm": optim.global_norm(grads),
                   "psnr": 10 * jnp.log10(4.0 / l2),
                   "usage": jnp.mean(usage >= dead_cfg.threshold / vocab),
                   "perplexity": jnp.exp(-jnp.sum(hits * jnp.log(jnp.maximum(hits, 1e-12)))),
                   "reinit": jnp.where(do_reinit, n_dead, 0).astype(jnp.float32)}
        return loop.TrainState(state.step + 1, params, opt_state, {"usage": usage}), metrics

    return loop.jit(train_step, config)


def evaluate(config, cfg: VQVAEConfig, params, num_images: int, dtype=jnp.bfloat16) -> dict:
    """Reconstruction MSE/PSNR (full token pyramid, clipped output) and code usage on the test split."""
    model = VQVAE(cfg, dtype)
    batch = min(num_images, config.vqvae.batch_size)
    dataset = data.of_config(config)

    def run(params, start):
        images, _ = dataset.make_batch(config.seed, start + jnp.arange(batch, dtype=jnp.int32), split="test",
                                       image_size=config.image_size)
        idx_list = model.apply({"params": params}, images, method=VQVAE.img_to_idx)
        recon = model.apply({"params": params}, idx_list, method=VQVAE.idx_to_img)
        used = jnp.stack([jnp.bincount(i.reshape(-1), length=cfg.vocab_size) > 0 for i in idx_list])
        return jnp.mean(jnp.square(recon - images)), used

    sq, used = [], np.zeros((len(cfg.patch_nums), cfg.vocab_size), bool)
    run = loop.jit(run, config)
    for start in range(0, num_images - batch + 1, batch):
        mse, u = run(params, start)
        sq.append(float(mse))
        used |= np.asarray(u)
    mse = float(np.mean(sq))
    return {"mse": mse, "psnr": float(10 * np.log10(4.0 / mse)), "codes_used": float(used.any(0).mean()),
            "codes_used_per_scale": [float(x) for x in used.mean(1)], "eval_images": len(sq) * batch}


def train_and_export(config, workdir: str) -> str:
    """Trains (resuming from workdir/vqvae/ckpt) and writes workdir/vqvae/export; returns the export path."""
    tc = config.vqvae
    cfg = model_config(config)
    model = VQVAE(cfg, jnp.dtype(tc.compute_dtype))
    tx = optim.make_optimizer(tc.optim, tc.num_steps)
    state = loop.run_stage(config, workdir, STAGE, tc, lambda: init_state(config, model, tx),
                           make_train_step(config, model, tx))
    if state is None:
        return ""
    shipped = export.cast_kernels(state.params, export.vqvae_keeps_float32)
    metrics = {}
    if tc.eval_images > 0:
        metrics = evaluate(config, cfg, export.as_float32(shipped), tc.eval_images, jnp.dtype(tc.compute_dtype))
    meta = {"steps": int(state.step), "seed": config.seed, "image_size": config.image_size,
            "dataset": config.get("dataset", data.DEFAULT),
            "train_images": config.train_images, "compute_dtype": tc.compute_dtype, "eval": metrics}
    return export.save(os.path.join(workdir, STAGE, "export"), shipped, kind=STAGE, config=cfg, meta=meta)
