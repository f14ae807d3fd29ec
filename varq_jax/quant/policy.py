"""The quantization policy: how every matmul site of the VAR transformer is fake-quantized.

One frozen dataclass, given to the same Flax modules as the FP model (`VAR(cfg, dtype, policy)`). Sites
(SHIFT_AND_SUM.md §1): every Linear — weights with static min-max (or AdaRound) parameters read from the
module's 'quant' variables, inputs with the dynamic per-token/per-group quantizer (signed split for fc2) —
and both attention matmuls through `sas_attention` (QKᵀ operands, log2 probabilities, shift-and-sum V with
the module's θ). Anything can be switched off, globally or per module path, for ablations and sensitivity
studies.
"""
import dataclasses
import fnmatch

import jax.numpy as jnp

from varq_jax.models.policy import MatmulPolicy
from varq_jax.models.var import dense
from varq_jax.quant import quantizers
from varq_jax.quant.sas_attention import sas_attention

ROUNDINGS = ("nearest", "soft", "hard")


@dataclasses.dataclass(frozen=True)
class QuantPolicy(MatmulPolicy):
    w_bits: int = 4
    a_bits: int = 6
    weights: bool = True                # fake-quantize Linear weights
    acts: bool = True                   # fake-quantize Linear inputs
    attn: bool = True                   # fake-quantize the QKᵀ and A·V operands
    shift_and_sum: bool = True          # shift-and-sum V (plain rounding when off)
    rounding: str = "nearest"           # nearest | soft (AdaRound, optimisation) | hard (AdaRound, learned)
    fp_modules: tuple = ()              # fnmatch patterns of module paths kept in full precision
    weights_prequantized: bool = False  # kernels already hold ŵ (see state.materialize_weights)
    report_errors: bool = False         # sow each Linear input's quantization error (for reports)
    blockwise_attention: bool = True

    def __post_init__(self):
        quantizers.check_bits(self.w_bits)
        quantizers.check_bits(self.a_bits)
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    def for_inference(self) -> "QuantPolicy":
        """Weights quantized once per sampling call instead of at every scale (soft rounding stays as is)."""
        if self.weights and self.rounding != "soft":
            return dataclasses.replace(self, weights_prequantized=True)
        return self

    def prepare_params(self, var_params, quant):
        if not self.weights_prequantized:
            return var_params
        from varq_jax.quant.state import materialize_weights
        return materialize_weights(var_params, quant, self)

    def is_fp(self, module) -> bool:
        path = "/".join(module.scope.path)
        return any(fnmatch.fnmatchcase(path, pat) for pat in self.fp_modules)

    # --- Linear ------------------------------------------------------------------------------------------------
    def quantized_kernel(self, module, kernel):
        if self.weights_prequantized:
            return kernel
        delta, zp = module.get_variable("quant", "delta"), module.get_variable("quant", "zero_point")
        if delta is None:
            raise ValueError(f"no 'quant' state for {'/'.join(module.scope.path)}: build it with "
                             f"varq_jax.quant.state.init_quant_state")
        if self.rounding == "nearest":
            return quantizers.fake_quant_weight(kernel, delta, zp, self.w_bits)
        alpha = module.get_variable("quant", "alpha")
        return quantizers.adaround_weight(kernel, alpha, delta, zp, self.w_bits, soft=self.rounding == "soft")

    def dense(self, module, x, kernel, bias):
        if self.is_fp(module):
            return dense(x, kernel, bias, module.dtype, module.out_dtype)
        if self.weights:
            kernel = self.quantized_kernel(module, kernel)
        if self.acts:
            quant = quantizers.act_quantizer(self.a_bits, kernel.shape[0], signed_split=module.site == "fc2")
            xf = x.astype(jnp.float32)
            x = quant(xf)
            if self.report_errors:
                module.sow("intermediates", "act_err", jnp.stack([jnp.sum(jnp.square(x - xf)), jnp.sum(jnp.square(xf))]))
        return dense(x, kernel, bias, module.dtype, module.out_dtype)

    # --- attention ---------------------------------------------------------------------------------------------
    def attention(self, module, q, k, v, scale):
        theta = module.get_variable("quant", "theta")
        on = self.attn and not self.is_fp(module)
        out, attn_mean = sas_attention(q, k, v, scale, a_bits=self.a_bits, theta=1.0 if theta is None else theta,
                                       quantize_qk=on, quantize_av=on, shift_and_sum=self.shift_and_sum)
        module.sow("intermediates", "attn_mean", attn_mean)     # θ statistics; a no-op unless collected
        return out
