"""Class-conditional sampling or zero-shot editing; writes a PNG grid and an .npz of uint8 images.

  python -m experiments.sample [--checkpoint DIR] --out OUT [--labels 1,2,3 | --num 16] [--seed 0]
  python -m experiments.sample --task inpaint --image in.png --box 0.2,0.2,0.8,0.8 --out OUT
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from varq_jax import cli, default_model, editing, image_io, sampling
from varq_jax.models.vqvae import VQVAE

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "checkpoint directory (default: the embedded default model)")
flags.DEFINE_string("out", "samples", "output directory")
flags.DEFINE_string("labels", None, "comma-separated class labels (default: cycle over classes)")
flags.DEFINE_integer("num", 16, "number of images when --labels is not given")
flags.DEFINE_integer("seed", 0, "PRNG seed")
flags.DEFINE_float("cfg", 1.5, "classifier-free guidance scale")
flags.DEFINE_integer("top_k", 900, "top-k (0 = off; clipped to the vocabulary size)")
flags.DEFINE_float("top_p", 0.96, "top-p in (0, 1]")
flags.DEFINE_bool("more_smooth", False, "Gumbel-softmax smoothing (visualisation, not for FID)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "compute dtype")
flags.DEFINE_enum("task", "generate", ["generate", *editing.TASKS], "generation or a zero-shot editing task")
flags.DEFINE_string("image", None, "input image for --task inpaint|outpaint|edit")
flags.DEFINE_string("box", "0.25,0.25,0.75,0.75", "edit box y0,x0,y1,x1 in fractions of the image")
flags.DEFINE_integer("class_label", 0, "target class for --task edit")
flags.DEFINE_bool("scan_blocks", True, "scan the blocks (fast compile) or unroll them (faster sampling on GPU, "
                  "2-3x the compile time)")
flags.register_validator("num", lambda n: n > 0, message="--num must be a positive number of images")


def _box_ok(box: str) -> bool:
    try:
        values = [float(v) for v in box.split(",")]
    except ValueError:
        return False
    return len(values) == 4 and all(0 <= v <= 1 for v in values)


flags.register_validator("box", _box_ok, message="--box must be four fractions y0,x0,y1,x1 in [0, 1]")


def main(argv):
    del argv
    cli.quiet_logs()
    ck = default_model.load_model(FLAGS.checkpoint)
    print(default_model.describe(ck))
    vcfg = ck.var_cfg
    settings = sampling.SamplingConfig(FLAGS.cfg, min(FLAGS.top_k, vcfg.vocab_size), FLAGS.top_p, FLAGS.more_smooth)
    kwargs = {}
    if FLAGS.task == "generate":
        labels = (np.array([int(x) for x in FLAGS.labels.split(",")]) if FLAGS.labels
                  else np.arange(FLAGS.num) % vcfg.num_classes)
    else:
        if not FLAGS.image:
            raise app.UsageError(f"--task {FLAGS.task} needs --image")
        keep = editing.box_keep_mask(vcfg.patch_nums[-1], FLAGS.box.split(","), FLAGS.task)
        img = image_io.load_image(FLAGS.image, ck.vae_cfg.image_size)
        n = FLAGS.num if FLAGS.labels is None else len(FLAGS.labels.split(","))
        gt = VQVAE(ck.vae_cfg).apply({"params": ck.params["vae"]}, jnp.asarray(img)[None], method=VQVAE.img_to_idx)
        kwargs = {"gt_tokens": [jnp.repeat(t, n, 0) for t in gt], "keep_mask": keep}
        labels = np.full(n, FLAGS.class_label if FLAGS.task == "edit" else vcfg.num_classes)
    sampling.validate(settings, vcfg, labels)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[FLAGS.dtype]
    sampler = sampling.Sampler(ck.vae_cfg, vcfg, settings, dtype=dtype, policy=ck.policy,
                               scan_blocks=FLAGS.scan_blocks)
    images, tokens = sampler(ck.params, labels, jax.random.PRNGKey(FLAGS.seed), quant=ck.quant, **kwargs)
    images = image_io.to_uint8(images)
    os.makedirs(FLAGS.out, exist_ok=True)
    image_io.save_png(os.path.join(FLAGS.out, "grid.png"), image_io.make_grid(images))
    image_io.save_npz(os.path.join(FLAGS.out, "samples.npz"), arr_0=images, labels=labels)
    print(f"wrote {len(images)} images to {FLAGS.out}/grid.png and {FLAGS.out}/samples.npz")


if __name__ == "__main__":
    cli.configure_xla()
    cli.run(main)
