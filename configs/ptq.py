"""Shared defaults of the PTQ presets (configs/w*a*.py, configs/fp.py); the official Shift-and-Sum settings.

Method switches, so that every ablation is one override away (or a preset argument, e.g. --config=w4a6:brecq):
  baseline        min-max weights, round-to-nearest, no reconstruction, no shift-and-sum, no resampling
  brecq           + BRECQ/AdaRound reconstruction
  brecq_sas       + shift-and-sum
  brecq_resample  + calibration data resampling
  full            both (the method of the paper; the default)
Mixed precision, the LiteVAR setting as secondary sources describe it (the LiteVAR paper itself is not reachable
here): the FC after GELU (fc2) kept at higher precision.
  litevar         brecq + fc2's weights and input in 16 bits (counted at 16×16 BOPs)
  full_litevar    full + the same fc2 rule
  litevar_w8      brecq + fc2 at W8A8
  full_litevar_w8 full + fc2 at W8A8

Per-module rules: `--config.rules="({'pattern': 'head', 'w_bits': 8},)"` — user rules come before the method's and
before what w_bits / a_bits / fp_modules expand to; for each setting the first matching rule that sets it wins
(fields: varq_jax.quant.Rule).
"""
import ml_collections

METHODS = {
    "baseline": dict(reconstruction=False, rounding="nearest", shift_and_sum=False, resampling=False),
    "brecq": dict(reconstruction=True, rounding="adaround", shift_and_sum=False, resampling=False),
    "brecq_sas": dict(reconstruction=True, rounding="adaround", shift_and_sum=True, resampling=False),
    "brecq_resample": dict(reconstruction=True, rounding="adaround", shift_and_sum=False, resampling=True),
    "full": dict(reconstruction=True, rounding="adaround", shift_and_sum=True, resampling=True),
}
FC2 = "blocks_*/ffn/fc2"
LITEVAR_FP16 = ({"pattern": FC2, "weights": False, "acts": False},)
LITEVAR_W8A8 = ({"pattern": FC2, "w_bits": 8, "a_bits": 8},)
METHODS.update({
    "litevar": dict(METHODS["brecq"], method_rules=LITEVAR_FP16),
    "full_litevar": dict(METHODS["full"], method_rules=LITEVAR_FP16),
    "litevar_w8": dict(METHODS["brecq"], method_rules=LITEVAR_W8A8),
    "full_litevar_w8": dict(METHODS["full"], method_rules=LITEVAR_W8A8),
})


def make(w_bits: int, a_bits: int, method: str = "full") -> ml_collections.ConfigDict:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    c = ml_collections.ConfigDict()
    c.quantize = True
    c.w_bits, c.a_bits = w_bits, a_bits
    c.method = method
    c.method_rules = ()                # the method's own rules (mixed precision), after the user's
    c.update(METHODS[method])
    c.quantize_weights = True          # per-site switches (ablations, sensitivity studies)
    c.quantize_acts = True
    c.quantize_attn = True
    c.fp_modules = ()                  # module path patterns kept in full precision, e.g. ("head", "blocks_0/*")
    c.rules = ()                       # per-module rules, e.g. ({"pattern": "head", "w_bits": 8},), first
    c.dtype = "bfloat16"               # compute dtype of sampling passes
    c.operand_dtype = "auto"           # quantized Linears' operands in 16-bit programs: auto (float16 on GPU, as the
                                       # official fp16 autocast; the compute dtype on TPU/CPU) | float16 | bfloat16
    c.matmul_precision = "highest"     # float32 programs at HIGHEST precision (GPU TF32 / TPU bf16 otherwise) | default

    c.calib = ml_collections.ConfigDict(dict(
        num_samples=256, seed=2025, cfg=1.5, top_k=900, top_p=0.96, batch_size=32,
        dtype="auto"))                 # of the calibration sampler: auto (= dtype) | bfloat16 | float32
    c.theta = ml_collections.ConfigDict(dict(alpha=0.01, n_grids=10_000, num_samples=1))
    c.recon = ml_collections.ConfigDict(dict(
        iters=5000, batch_size=4, lr=1e-4, weight=1e-5, p=2.0, b_start=20.0, b_end=2.0, warmup=0.0,
        inputs="fp",                   # fp | quant: inputs from the FP model or the partly quantized one
        units=()))                     # reconstruct only these units (e.g. ("head",)); () = all, in model order
    c.samples = ml_collections.ConfigDict(dict(num=16, seed=0))   # FP vs quantized comparison grid (0: none)
    return c
