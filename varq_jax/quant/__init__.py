"""Shift-and-Sum post-training quantization of VAR: the public API.

Quantization is data: a `QuantPolicy` is an ordered table of `Rule`s over full module paths, resolved per site by
`QuantPolicy.rule_for`; quantizers are found by name in a registry, so a policy and the checkpoint that stores it
round-trip. `quantize` runs the whole PTQ pipeline; `save_quantized` / `load_quantized` store integer codes.
See docs/extending.md.
"""
from varq_jax.quant.export import load_quantized, save_quantized
from varq_jax.quant.pipeline import PTQResult, quantize
from varq_jax.quant.policy import QuantPolicy
from varq_jax.quant.reconstruction import ReconConfig
from varq_jax.quant.registry import (ActQuantizer, WeightQuantizer, register_act_quantizer,
                                     register_weight_quantizer)
from varq_jax.quant.rules import Rule, SiteRule
from varq_jax.quant.settings import CalibSettings, PTQSettings, ThetaSettings
from varq_jax.quant.state import init_quant_state

__all__ = ["ActQuantizer", "CalibSettings", "PTQResult", "PTQSettings", "QuantPolicy", "ReconConfig", "Rule",
           "SiteRule", "ThetaSettings", "WeightQuantizer", "init_quant_state", "load_quantized", "quantize",
           "register_act_quantizer", "register_weight_quantizer", "save_quantized"]
