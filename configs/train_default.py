# python -m experiments.train --config=configs/train_default.py --workdir=runs/default --stage=all
"""Training of the embedded default model on the synthetic shapes (64×64 px, 10 classes), sized for one H100.

Stages run in order vqvae → var (trained on the exported VQVAE's tokens) → classifier; each resumes from its
last checkpoint. Estimated cost on one H100 (XLA cost analysis of the jitted steps; memory traffic is the
fused per-step byte count of the CPU compilation, a pessimistic stand-in for the GPU's):
  vqvae       64 img/step  · 8000 steps: 0.45 TFLOP, ~20–30 GB per step  → ~10 ms/step, ~1.5–2 min
  var        256 img/step  · 5000 steps: 1.5 TFLOP (0.19 of it tokenising), ~40–90 GB per step
                                                                           → ~20 ms/step, ~1.5–3 min
  classifier 128 img/step  · 2000 steps: 0.11 TFLOP, ~9 GB per step       → ~4 ms/step, ~10 s
plus ~2 min of compilation, evaluation and start-up: about 5–6 min in all, 8 at worst. The logs show steps/s
and the ETA after the first few hundred steps; scale num_steps if the rate differs.
Shipped sizes (bf16 kernels): VQVAE 4.0 MB + VAR 15.0 MB + classifier 1.0 MB.

`get_config("toy")` shrinks models, images (16 px) and steps so a whole run takes seconds on a CPU (tests).
Fields shared by the VQVAE and the VAR (patch_nums, vocab_size, cvae) live at the top level.
"""
import ml_collections


def _optim(lr, warmup_steps, weight_decay, b2, grad_clip, end_ratio=0.05):
    return ml_collections.ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, warmup_init=0.01, end_ratio=end_ratio,
                                          b1=0.9, b2=b2, weight_decay=weight_decay, grad_clip=grad_clip))


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = "shapes"     # varq_jax.data.DATASETS
    c.image_size = 64
    c.patch_nums = (1, 2, 3, 4, 5, 6, 8)
    c.vocab_size = 512
    c.cvae = 32
    c.train_images = 0       # 0: every step renders fresh images; N > 0: cycle through the first N
    c.stop_at_step = -1      # ≥ 0: end this invocation at that step (checkpointed), as a preemption would
    c.compiler_options = ml_collections.ConfigDict()     # XLA options for every jitted function (toy: fast compile)

    c.vqvae = ml_collections.ConfigDict()
    c.vqvae.model = ml_collections.ConfigDict(dict(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                                                   share_quant_resi=4, quant_resi=0.5, beta=0.25,
                                                   using_sa=True, using_mid_sa=True))
    c.vqvae.batch_size = 64
    c.vqvae.num_steps = 8000
    c.vqvae.compute_dtype = "bfloat16"
    c.vqvae.l1_weight = 1.0
    c.vqvae.l2_weight = 1.0
    c.vqvae.vq_weight = 1.0
    # codes hit at < 3 % of the uniform rate (EMA over ~20 steps) are re-seeded from encoder outputs every 25 steps
    c.vqvae.dead_code = ml_collections.ConfigDict(dict(every=25, until=0.8, threshold=0.03, decay=0.95))
    c.vqvae.optim = _optim(lr=5e-4, warmup_steps=200, weight_decay=0.0, b2=0.99, grad_clip=1.0)
    c.vqvae.log_every = 200
    c.vqvae.ckpt_every = 1000
    c.vqvae.eval_images = 1024       # test-split images evaluated after training (0: skip)

    c.var = ml_collections.ConfigDict()
    c.var.model = ml_collections.ConfigDict(dict(depth=6, width=256, heads=4, mlp_ratio=4.0, attn_l2_norm=True,
                                                 shared_aln=False))
    c.var.init = ml_collections.ConfigDict(dict(adaln=0.5, adaln_gamma=1e-5, head=0.02))
    c.var.batch_size = 256
    c.var.num_steps = 5000
    c.var.compute_dtype = "bfloat16"
    c.var.tokenizer_dtype = "bfloat16"
    c.var.cond_drop_rate = 0.1
    c.var.optim = _optim(lr=6e-4, warmup_steps=250, weight_decay=0.05, b2=0.95, grad_clip=2.0, end_ratio=0.01)
    c.var.log_every = 200
    c.var.ckpt_every = 1000
    c.var.eval_images = 2048

    c.classifier = ml_collections.ConfigDict()
    c.classifier.model = ml_collections.ConfigDict(dict(widths=(32, 64, 96, 128), feature_dim=128, groups=8))
    c.classifier.batch_size = 128
    c.classifier.num_steps = 2000
    c.classifier.compute_dtype = "bfloat16"
    c.classifier.optim = _optim(lr=1e-3, warmup_steps=100, weight_decay=0.05, b2=0.99, grad_clip=1.0)
    c.classifier.log_every = 200
    c.classifier.ckpt_every = 1000
    c.classifier.eval_images = 2048

    if arg == "toy":
        _shrink(c)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; valid: '' (full size) or 'toy'")
    return c


def _shrink(c):
    """Seconds on a CPU: 16-px images, 4×4 latent, one-block VAR, few steps, float32, unoptimised XLA."""
    c.image_size = 16
    c.compiler_options = ml_collections.ConfigDict({"xla_backend_optimization_level": 0})
    c.patch_nums = (1, 2, 4)
    c.vocab_size = 32
    c.cvae = 8
    c.vqvae.model.update(ch=32, ch_mult=(1, 1, 1), num_res_blocks=0, using_sa=False, using_mid_sa=False)
    c.vqvae.batch_size = 8
    c.vqvae.num_steps = 12
    c.vqvae.dead_code.every = 4
    c.vqvae.optim.warmup_steps = 2
    c.var.model.update(depth=1, width=64, heads=1)
    c.var.batch_size = 8
    c.var.num_steps = 12
    c.var.optim.warmup_steps = 2
    c.classifier.model.update(widths=(8, 16), feature_dim=16, groups=4)
    c.classifier.batch_size = 16
    c.classifier.num_steps = 12
    c.classifier.optim.warmup_steps = 2
    c.var.tokenizer_dtype = "float32"
    for stage in (c.vqvae, c.var, c.classifier):
        stage.compute_dtype = "float32"             # bf16 is emulated (slow) on CPUs
        stage.log_every = 4
        stage.ckpt_every = 4
        stage.eval_images = 16
