# python -m experiments.quantize --config=w6a6   (method variants: --config=w6a6:baseline|brecq|brecq_sas|brecq_resample|full)
"""W6/A6 Shift-and-Sum PTQ of VAR (defaults: the full method with the official settings)."""
from configs import ptq


def get_config(arg: str = ""):
    return ptq.make(w_bits=6, a_bits=6, method=arg or "full")
