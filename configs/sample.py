"""Sampling settings (experiments.sample): which images and how they are drawn, or a zero-shot editing task.

Paths (--checkpoint, --out, --image) and execution choices (--dtype, --scan_blocks) are flags of the CLI.
"""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.labels = ""                 # comma-separated class labels ("": cycle over the classes, num images)
    c.num = 16                    # images when labels is empty
    c.seed = 0
    c.cfg = 1.5                   # classifier-free guidance scale
    c.top_k = 900                 # 0 = off; clipped to the vocabulary size
    c.top_p = 0.96
    c.more_smooth = False         # Gumbel-softmax smoothing (visualisation, not for FID)
    c.task = "generate"           # generate | inpaint | outpaint | edit
    c.box = (0.25, 0.25, 0.75, 0.75)              # edit box y0,x0,y1,x1 in fractions of the image
    c.class_label = 0             # target class of the edit task
    return c
