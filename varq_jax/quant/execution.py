"""Integer execution of a quantized VAR: the same rule table, run on integer codes (`integer.py`).

`IntegerPolicy` is a `QuantPolicy` whose Linears take their weights from integer forms in the 'quant' collection
(the float kernels of coded Linears are not in 'params' at all) and multiply integer activation codes made on the
fly; a weight-only site (inputs not quantized) dequantizes its codes into the compute dtype. Attention keeps the
simulation's semantics (quantized QKᵀ operands, log2 probabilities, shift-and-sum V). `integer_model` turns a
simulated model (float kernels + grids, AdaRound α) into that form once; `export.load_quantized(...,
execution="int")` builds it straight from a checkpoint's codes.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from varq_jax.models.var import dense as float_dense
from varq_jax.quant import integer, rules as rules_lib, state
from varq_jax.quant.policy import QuantPolicy

EXECUTIONS = ("simulate", "int")
KERNELS = ("auto", "xla", "pallas")
GEMMS = KERNELS + ("dequant",)
FORM = ("codes", "scale", "zero", "bsum")


def site_plan(rule, path: str, in_features: int) -> integer.Plan:
    site = path.rsplit("/", 1)[-1]
    return integer.plan(rule, site, in_features, path) if rule.acts else integer.weight_plan(rule, in_features)


def is_integer(quant) -> bool:
    return quant is not None and any(p[-1] == "codes" for p in traverse_util.flatten_dict(quant))


def from_coded(var_params: dict, coded: dict, quant: dict, policy: QuantPolicy):
    """(params without the coded kernels, quant with each coded Linear's integer form) from uint codes
    {path tuple: [K, N]} and the grids in `quant`; other 'quant' entries (θ) are kept, AdaRound α dropped."""
    flat_p = dict(traverse_util.flatten_dict(var_params))
    flat_q = traverse_util.flatten_dict(state.without_alpha(quant))
    integer_sites = {p for p in coded if policy.rule_for("/".join(p)).weights}
    out_q = {p: a for p, a in flat_q.items() if p[:-1] not in integer_sites and p[:-2] not in integer_sites}
    for path, codes in coded.items():
        key = "/".join(path)
        rule = policy.rule_for(key)
        if not rule.weights:     # format-1 checkpoints coded full-precision sites too: those run as their ŵ
            node = {"delta": flat_q[path + ("delta",)], "zero_point": flat_q[path + ("zero_point",)]}
            flat_p[path + ("kernel",)] = state.dequantize(codes, node)
            continue
        flat_p.pop(path + ("kernel",), None)
        p = site_plan(rule, key, codes.shape[0])
        form = integer.weight_form(p, codes, flat_q[path + ("delta",)], flat_q[path + ("zero_point",)])
        out_q.update({path + (k,): v for k, v in form.items()})
    return traverse_util.unflatten_dict(flat_p), traverse_util.unflatten_dict(out_q)


def integer_model(var_params: dict, quant: dict, policy: QuantPolicy):
    """The integer form of a simulated model: codes from its kernels and grids (the learned rounding where the
    policy's phase is hard), as `state.site_codes` gives them to the quantized checkpoint."""
    flat_p, flat_q = traverse_util.flatten_dict(var_params), traverse_util.flatten_dict(quant)
    coded = {}
    for path in state.linear_paths(var_params):
        node = {k[-1]: v for k, v in flat_q.items() if k[:-1] == path}
        c = state.site_codes(path, flat_p[path + ("kernel",)], node, policy)
        if c is not None:
            coded[path] = c[0]
    return from_coded(var_params, coded, quant, policy)


def model_bytes(var_params: dict, quant: dict) -> dict:
    """Bytes held by an integer model: {'coded_linears' (codes + scales + zero points + sums), 'other'}."""
    flat_q = traverse_util.flatten_dict(quant)
    coded = integer.weight_bytes({p: a for p, a in flat_q.items() if p[-1] in FORM})
    rest = integer.weight_bytes({p: a for p, a in flat_q.items() if p[-1] not in FORM})
    return {"coded_linears": coded, "other": rest + integer.weight_bytes(traverse_util.flatten_dict(var_params))}


@dataclasses.dataclass(frozen=True)
class IntegerPolicy(QuantPolicy):
    kernel: str = "auto"          # integer GEMM: xla | pallas (Triton) | auto (see `gemm`) | dequant (below)
    act_kernel: str = "auto"      # activation codes: xla | pallas (one-pass Triton kernel, `act_kernel.py`) | auto
    attn_kernel: str = "xla"      # quantized attention: xla | pallas (scores never written, `attn_kernel.py`)
    interpret: bool = False       # run the Pallas kernels in interpret mode (tests on CPU)

    execution = "int"             # what a sample set made with this policy records (not a field)

    def __post_init__(self):
        super().__post_init__()
        if self.kernel not in GEMMS:
            raise ValueError(f"kernel must be one of {GEMMS}, got {self.kernel!r}")
        if self.act_kernel not in KERNELS:
            raise ValueError(f"act_kernel must be one of {KERNELS}, got {self.act_kernel!r}")
        if self.attn_kernel not in KERNELS[1:]:
            raise ValueError(f"attn_kernel must be one of {KERNELS[1:]}, got {self.attn_kernel!r}")

    @classmethod
    def of(cls, policy: QuantPolicy, **changes) -> "IntegerPolicy":
        """The integer execution of a simulated policy (same rule table; hard weights stay hard)."""
        if not isinstance(policy, QuantPolicy):
            raise ValueError(f"integer execution needs a quantization policy, got {type(policy).__name__}")
        fields = {f.name: getattr(policy, f.name) for f in dataclasses.fields(QuantPolicy)}
        fields.update(weights_prequantized=False, observe_acts=False, report_errors=False)
        if fields["phase"] == "soft":
            raise ValueError("integer execution needs hard weights (phase nearest or hard, not soft)")
        return cls(**{**fields, **changes})

    def check(self, var_cfg) -> "IntegerPolicy":
        super().check(var_cfg)
        for s in rules_lib.model_sites(var_cfg):
            if s.kind == rules_lib.LINEAR:
                rule = self.rule_for(s.path)
                if rule.acts or rule.weights:
                    site_plan(rule, s.path, s.in_features)
        return self

    def for_inference(self) -> "IntegerPolicy":
        return self

    def prepare_params(self, var_params, quant):
        """The integer form (idempotent: a model already in it is returned as is)."""
        if is_integer(quant):
            return var_params, quant
        return integer_model(var_params, quant, self)

    def attention_kernel(self) -> dict:
        return {"kernel": self.attn_kernel, "interpret": self.interpret}

    def gemm(self, p: integer.Plan) -> str:
        """auto: on GPU the Pallas kernel for group-wise sites (XLA writes one int32 product per K-block) and XLA's
        int8 dot for per-channel × per-token ones (faster there on an H200); XLA elsewhere."""
        if self.kernel != "auto":
            return self.kernel
        return "pallas" if jax.default_backend() == "gpu" and p.num_blocks > 1 else "xla"

    def act_codes_kernel(self) -> str:
        """auto: the one-pass kernel on GPU (bit-identical codes; 21 ms of a 555 ms d16 W4A6 call on an H200,
        BENCHMARKS.md), XLA elsewhere."""
        if self.act_kernel != "auto":
            return self.act_kernel
        return "pallas" if jax.default_backend() == "gpu" else "xla"

    def dense(self, module, x, kernel, bias):
        rule = self.module_rule(module)
        path = rules_lib.join(self.prefix, "/".join(module.scope.path))
        if not rule.weights:
            if rule.acts:
                site_plan(rule, path, x.shape[-1])          # raises: no integer form
            return float_dense(x, kernel, bias, module.dtype, module.out_dtype)
        form = {k: module.get_variable("quant", k) for k in FORM}
        if form["codes"] is None:
            raise ValueError(f"no integer codes for {path}: build the integer model with "
                             f"IntegerPolicy.prepare_params (or load the checkpoint with execution='int')")
        p = site_plan(rule, path, x.shape[-1])
        out_dtype = module.out_dtype or module.dtype
        if not rule.acts:
            w_hat = integer.dequantize(p, form)
            return float_dense(x, w_hat, bias, module.dtype, module.out_dtype)
        if self.kernel == "dequant":
            # the simulation's arithmetic from the stored codes: ŵ made in the call, x̂ fake-quantized, both in
            # the simulation's operand dtype (a 16-bit GEMM, not integer arithmetic) — the codes' memory at the
            # simulation's speed
            with jax.named_scope("act_quant"):
                x_hat = self.quantized_input(module, x.astype(jnp.float32), rule, x.shape[-1])
            return float_dense(x_hat, integer.dequantize(p, form), bias, self.operands(module.dtype), out_dtype)
        return integer.dense(p, x, form, bias, out_dtype, kernel=self.gemm(p), interpret=self.interpret,
                             act=self.act_codes_kernel())
