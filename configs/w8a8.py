# python -m experiments.quantize --config=w8a8   (method variants: --config=w8a8:baseline|brecq|brecq_sas|brecq_resample|full)
"""W8/A8 Shift-and-Sum PTQ of VAR (defaults: the full method with the official settings)."""
from configs import ptq


def get_config(arg: str = ""):
    return ptq.make(w_bits=8, a_bits=8, method=arg or "full")
