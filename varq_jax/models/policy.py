"""The hook through which quantization enters the models.

The VAR modules call `policy.dense(module, x, kernel, bias)` for every Linear and
`policy.attention(module, q, k, v, scale)` for every attention evaluation, where q holds the queries of one
scale and k/v exactly the keys those queries may see (all cached scales ≤ the current one). `policy=None` is
full precision. A policy is a frozen (hashable) dataclass: it is a static attribute of the Flax module, so a
jitted program is compiled per policy. Calibrated state is created by the policy through
`module.variable('quant', ...)`, so it lives in its own collection, never in 'params'.
"""


class MatmulPolicy:
    """Base class documenting the contract; subclasses are frozen dataclasses."""

    # When True the teacher-forced forward evaluates attention per scale block (queries of scale s with the
    # keys of scales ≤ s), so range-dependent quantizers see the same tensors as in KV-cached inference.
    blockwise_attention: bool = True

    def for_inference(self) -> "MatmulPolicy":
        """The policy a sampler builds its model with (e.g. one that expects pre-quantized weights)."""
        return self

    def prepare_params(self, var_params, quant):
        """Called once per sampling call by the inference policy, before the scale loop: the (params, quant)
        the blocks then run with (e.g. kernels quantized once)."""
        return var_params, quant

    def dense(self, module, x, kernel, bias):
        raise NotImplementedError

    def attention(self, module, q, k, v, scale):
        raise NotImplementedError
