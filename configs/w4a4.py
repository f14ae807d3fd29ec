# python -m experiments.quantize --config=w4a4   (method variants: --config=w4a4:baseline|brecq|brecq_sas|brecq_resample|full)
"""W4/A4 Shift-and-Sum PTQ of VAR (defaults: the full method with the official settings)."""
from configs import ptq


def get_config(arg: str = ""):
    return ptq.make(w_bits=4, a_bits=4, method=arg or "full")
