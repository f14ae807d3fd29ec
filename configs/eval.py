"""Evaluation settings (experiments.evaluate): which images, how they are sampled, the zero-shot tasks.

Paths (checkpoints, references, Inception, classifier, inputs) and execution choices (dtype, batches, mesh,
block mode, XLA options) are flags of the CLI, not settings.
"""
import ml_collections


def get_config(arg: str = ""):
    """arg: comma-separated variants. "ablate": the ablation protocol's defaults (num_images is per seed);
    "research": the research model's sampling (top-p 0.5, docs/research_model.md: at the official 0.96 its FP
    class accuracy is 0.88, at 0.5 0.94, with W4A4 still 0.14 below it), e.g. `--eval=configs/eval.py:ablate,research`."""
    variants = [v for v in arg.split(",") if v]
    unknown = [v for v in variants if v not in ("ablate", "research")]
    if unknown:
        raise ValueError(f"unknown eval config argument {unknown[0]!r}; valid: 'ablate', 'research' or both, "
                         "comma-separated")
    c = ml_collections.ConfigDict()
    c.num_images = 0              # 0: num_per_class × the model's classes
    c.num_per_class = 50
    c.seed = 0                    # image i uses the key fold_in(PRNGKey(seed), i)
    c.cfg = 1.5                   # classifier-free guidance scale
    c.top_k = 900                 # 0 = off; clipped to the vocabulary size
    c.top_p = 0.96
    c.num_real = 0                # real shapes images for the classifier Fréchet distance (0: as many as samples)
    c.grid_images = 64            # images in grid.png
    c.shard_size = 0              # images per shard file, fixed for a run (0: the per-device batch)
    c.tasks = ("inpaint", "outpaint", "edit")      # zero-shot tasks (with --zero_shot)
    c.box = (0.25, 0.25, 0.75, 0.75)              # zero-shot box y0,x0,y1,x1 (fractions) unless the npz has boxes
    c.edit_class = 0              # target class of the edit task unless the npz has target_labels
    if "ablate" in variants:
        c.num_images = 1000       # per seed of the protocol (experiments.ablate --seeds)
    if "research" in variants:
        c.top_p = 0.5
    return c
