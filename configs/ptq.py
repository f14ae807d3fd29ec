"""Shared defaults of the PTQ presets (configs/w*a*.py, configs/fp.py); the official Shift-and-Sum settings.

Method switches, so that every ablation is one override away (or a preset argument, e.g. --config=w4a6:brecq):
  baseline        min-max weights, round-to-nearest, no reconstruction, no shift-and-sum, no resampling
  brecq           + BRECQ/AdaRound reconstruction
  brecq_sas       + shift-and-sum
  brecq_resample  + calibration data resampling
  full            both (the method of the paper; the default)
"""
import ml_collections

METHODS = {
    "baseline": dict(reconstruction=False, rounding="nearest", shift_and_sum=False, resampling=False),
    "brecq": dict(reconstruction=True, rounding="adaround", shift_and_sum=False, resampling=False),
    "brecq_sas": dict(reconstruction=True, rounding="adaround", shift_and_sum=True, resampling=False),
    "brecq_resample": dict(reconstruction=True, rounding="adaround", shift_and_sum=False, resampling=True),
    "full": dict(reconstruction=True, rounding="adaround", shift_and_sum=True, resampling=True),
}


def make(w_bits: int, a_bits: int, method: str = "full") -> ml_collections.ConfigDict:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    c = ml_collections.ConfigDict()
    c.quantize = True
    c.w_bits, c.a_bits = w_bits, a_bits
    c.method = method
    c.update(METHODS[method])
    c.quantize_weights = True          # per-site switches (ablations, sensitivity studies)
    c.quantize_acts = True
    c.quantize_attn = True
    c.fp_modules = ()                  # module path patterns kept in full precision, e.g. ("head", "blocks_0/*")
    c.dtype = "bfloat16"               # compute dtype of sampling passes

    c.calib = ml_collections.ConfigDict(dict(
        num_samples=256, seed=2025, cfg=1.5, top_k=900, top_p=0.96, batch_size=32))
    c.theta = ml_collections.ConfigDict(dict(alpha=0.01, n_grids=10_000, num_samples=1))
    c.recon = ml_collections.ConfigDict(dict(
        iters=5000, batch_size=4, lr=1e-4, weight=1e-5, p=2.0, b_start=20.0, b_end=2.0, warmup=0.0,
        inputs="fp"))                  # fp | quant: inputs from the FP model or the partly quantized one
    c.samples = ml_collections.ConfigDict(dict(num=16, seed=0))   # FP vs quantized comparison grid (0: none)
    return c
