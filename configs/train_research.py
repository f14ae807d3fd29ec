# python -m experiments.train --config=configs/train_research.py --workdir=runs/research --stage=vqvae
# python -m experiments.train --config=configs/train_research.py --workdir=runs/research --stage=var
"""Training of the embedded research model: the paper's regime at a size that trains on one GPU in minutes.

What makes it the research default (issue 18): ImageNet's ten-scale schedule (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) on a
16×16 latent (64 px, VQVAE downsampling 4), 680 tokens per image as at 256 px ImageNet, depth 12, and the
100-class `shapes100` data (shape × texture × layout), whose classes hinge on fine structure that low-bit
activations blur. Width 128 (4 heads of 32) keeps the shipped files under 16 MB (bf16 kernels: VQVAE 3.0 MB,
VAR 7.7 MB, classifier 1.4 MB).

Two device commands of ≤ 10 minutes each: the VQVAE and the classifier (independent of the VQVAE), then the
VAR on the exported VQVAE's tokens. On an H200 (2026-12-02): VQVAE 26 steps/s, classifier 240 steps/s; the VAR's
step is 36 ms at batch 128 with fused attention under the block-causal mask (session 11's breakdown), so
var.num_steps = 12,000 makes its training 7.1 minutes (measured: 28.0 steps/s, 509 s for the whole command).
`get_config("toy")` is the same structure at CPU-test size.
"""
from configs import train_default


def get_config(arg: str = ""):
    c = train_default.get_config()
    c.dataset = "shapes100"
    c.image_size = 64
    c.patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    c.vocab_size = 1024
    c.cvae = 32

    c.vqvae.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)
    c.vqvae.batch_size = 64
    c.vqvae.num_steps = 5000

    c.var.model.update(depth=12, width=128, heads=4)
    c.var.batch_size = 128
    c.var.num_steps = 12000
    c.var.optim.update(lr=8e-4, warmup_steps=300)
    c.var.eval_images = 2048

    c.classifier.model.update(widths=(32, 64, 128, 192), feature_dim=128, groups=8)
    c.classifier.batch_size = 128
    c.classifier.num_steps = 4000
    c.classifier.eval_images = 4000

    if arg == "toy":
        train_default._shrink(c)
        c.patch_nums = (1, 2, 4)
        c.var.model.update(depth=2, width=64, heads=2)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; valid: '' (full size) or 'toy'")
    return c
