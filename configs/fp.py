# python -m experiments.quantize --config=fp
"""Full precision: no quantization; the pipeline only samples and reports (the reference point of every table)."""
from configs import ptq


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"the fp preset takes no argument, got {arg!r}")
    c = ptq.make(w_bits=8, a_bits=8, method="baseline")
    c.quantize = False
    return c
