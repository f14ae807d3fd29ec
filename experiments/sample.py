"""Class-conditional sampling or zero-shot editing; writes a PNG grid and an .npz of uint8 images.

  python -m experiments.sample [--checkpoint=DIR] --out=OUT [--config.labels=1,2,3 | --config.num=16] [--config.seed=0]
  python -m experiments.sample --config.task=inpaint --image=in.png --config.box=0.2,0.2,0.8,0.8 --out=OUT

Settings go through --config (configs/sample.py; --config.FIELD=VALUE), paths and execution choices are flags.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from varq_jax import cli, default_model, editing, image_io, sampling
from varq_jax.models.vqvae import VQVAE

FLAGS = flags.FLAGS
SETTINGS = os.path.join(cli.CONFIG_DIR, "sample.py")
RENAMED = ("labels", "num", "seed", "cfg", "top_k", "top_p", "more_smooth", "task", "box", "class_label")
if __name__ == "__main__":          # before the config flag reads its --config.* overrides
    cli.refuse_renamed(sys.argv, RENAMED)
    sys.argv = cli.rewrite_config_argv(sys.argv, default=SETTINGS)
config_flags.DEFINE_config_file("config", SETTINGS, "sampling settings (configs/sample.py)", lock_config=True)
flags.DEFINE_string("checkpoint", None, "checkpoint directory (default: the embedded default model)")
flags.DEFINE_string("out", "samples", "output directory")
flags.DEFINE_string("image", None, "input image for config.task inpaint|outpaint|edit")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype")
flags.DEFINE_enum("execution", "simulate", ["simulate", "int"], "a quantized checkpoint: simulate (fake quant, "
                  "float weights) or int (integer weight codes in memory, integer GEMMs; README: what runs where)")
flags.DEFINE_bool("scan_blocks", True, "scan the blocks (fast compile) or unroll them (faster sampling on GPU, "
                  "2-3x the compile time)")


def _box(box) -> tuple:
    values = box.split(",") if isinstance(box, str) else box
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 4 or not all(0 <= v <= 1 for v in values):
        raise ValueError(f"config.box must be four fractions y0,x0,y1,x1 in [0, 1], got {box!r}")
    return values


def main(argv):
    del argv
    cli.quiet_logs()
    c = FLAGS.config
    if c.num <= 0:
        raise ValueError(f"config.num must be a positive number of images, got {c.num}")
    if c.task not in ("generate", *editing.TASKS):
        raise ValueError(f"config.task must be one of generate, {', '.join(editing.TASKS)}; got {c.task!r}")
    box = _box(c.box)
    try:
        given = [int(x) for x in str(c.labels).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"config.labels must be comma-separated integers, got {c.labels!r}") from None
    ck = default_model.load_model(FLAGS.checkpoint, execution=FLAGS.execution)
    print(default_model.describe(ck))
    vcfg = ck.var_cfg
    settings = sampling.SamplingConfig(c.cfg, min(c.top_k, vcfg.vocab_size), c.top_p, c.more_smooth)
    kwargs = {}
    if c.task == "generate":
        labels = np.array(given) if given else np.arange(c.num) % vcfg.num_classes
    else:
        if not FLAGS.image:
            raise ValueError(f"config.task={c.task} needs --image")
        keep = editing.box_keep_mask(vcfg.patch_nums[-1], box, c.task)
        img = image_io.load_image(FLAGS.image, ck.vae_cfg.image_size)
        n = len(given) or c.num
        gt = VQVAE(ck.vae_cfg).apply({"params": ck.params["vae"]}, jnp.asarray(img)[None], method=VQVAE.img_to_idx)
        kwargs = {"gt_tokens": [jnp.repeat(t, n, 0) for t in gt], "keep_mask": keep}
        labels = np.full(n, c.class_label if c.task == "edit" else vcfg.num_classes)
    sampling.validate(settings, vcfg, labels)
    dtype = sampling.DTYPES[FLAGS.dtype]
    sampler = sampling.Sampler(ck.vae_cfg, vcfg, settings, dtype=dtype, policy=ck.policy,
                               scan_blocks=FLAGS.scan_blocks, execution=FLAGS.execution)
    images, tokens = sampler(ck.params, labels, jax.random.PRNGKey(c.seed), quant=ck.quant, **kwargs)
    images = image_io.to_uint8(images)
    os.makedirs(FLAGS.out, exist_ok=True)
    image_io.save_png(os.path.join(FLAGS.out, "grid.png"), image_io.make_grid(images))
    image_io.save_npz(os.path.join(FLAGS.out, "samples.npz"), arr_0=images, labels=labels)
    print(f"wrote {len(images)} images to {FLAGS.out}/grid.png and {FLAGS.out}/samples.npz")


if __name__ == "__main__":
    cli.configure_xla()
    cli.run(main)
