"""Zero-shot editing masks as the official demo builds them (1 = keep the input image's tokens)."""
import numpy as np

TASKS = ("inpaint", "outpaint", "edit")


def box_keep_mask(pn: int, box, task: str) -> np.ndarray:
    """[pn, pn] float mask from a box (y0, x0, y1, x1) in fractions of the image.

    inpaint / edit: regenerate inside the box, keep outside; outpaint: keep the box, regenerate outside.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    y0, x0, y1, x1 = (float(v) for v in box)
    if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
        raise ValueError(f"box (y0, x0, y1, x1) = {tuple(box)} must satisfy 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1 "
                         f"(fractions of the image)")
    inside = np.zeros((pn, pn), np.float32)
    inside[round(y0 * pn):round(y1 * pn), round(x0 * pn):round(x1 * pn)] = 1
    if not inside.any():
        raise ValueError(f"box {tuple(box)} covers no token of the {pn}x{pn} map")
    return inside if task == "outpaint" else 1 - inside
