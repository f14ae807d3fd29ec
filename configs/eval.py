"""Evaluation settings (experiments.evaluate): which images, how they are sampled, the zero-shot tasks.

Paths (checkpoints, references, Inception, classifier, inputs) and execution choices (dtype, batches, mesh,
block mode, XLA options) are flags of the CLI, not settings.
"""
import ml_collections


def get_config(arg: str = ""):
    """arg "ablate": the ablation protocol's defaults (experiments.ablate: num_images is per seed)."""
    if arg not in ("", "ablate"):
        raise ValueError(f"unknown eval config argument {arg!r}; valid: '' or 'ablate'")
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
    if arg == "ablate":
        c.num_images = 1000       # per seed of the protocol (experiments.ablate --seeds)
    return c
