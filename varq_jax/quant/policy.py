"""The quantization policy: a rule table (`rules.py`) that the same Flax modules as the FP model obey.

`VAR(cfg, dtype, policy)` calls `policy.dense` for every Linear and `policy.attention` for every attention (per
scale block, with exactly the keys KV-cached inference sees). Both ask `rule_for(full module path)` how the site
is quantized: weights with the calibrated grid in the module's 'quant' variables (round-to-nearest, or AdaRound
α), inputs with the site's registered activation quantizer, attention operands (QKᵀ, log2 probabilities,
shift-and-sum V with the module's θ).

The table is `rules` (the user's, first) followed by what the shorthands `w_bits`, `a_bits`, `fp_modules` and
the global switches expand to (`rules.shorthand_rules`). `phase` says how learnable (AdaRound) sites round:
nearest (before reconstruction), soft (its optimisation), hard (learned: 1[α ≥ 0] where α exists, nearest where
it does not).
"""
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from varq_jax.models.policy import MatmulPolicy
from varq_jax.models.var import dense
from varq_jax.quant import quantizers, registry, rules as rules_lib, state
from varq_jax.quant.rules import Rule, SiteRule
from varq_jax.quant.sas_attention import sas_attention

PHASES = ("nearest", "soft", "hard")
OPERAND_DTYPES = ("auto", "float16", "bfloat16", "compute")


@dataclasses.dataclass(frozen=True)
class QuantPolicy(MatmulPolicy):
    w_bits: int = 4
    a_bits: int = 6
    weights: bool = True                # shorthand: quantize Linear weights
    acts: bool = True                   # shorthand: quantize Linear inputs
    attn: bool = True                   # shorthand: quantize the QKᵀ and A·V operands
    shift_and_sum: bool = True          # shorthand: shift-and-sum V (plain rounding when off)
    fp_modules: tuple = ()              # shorthand: fnmatch patterns of module paths kept in full precision
    rules: tuple = ()                   # user rules (`rules.Rule`), before the shorthands
    phase: str = "nearest"              # how AdaRound sites round: nearest | soft (optimisation) | hard (learned)
    prefix: str = ""                    # path of the module the policy is applied to (standalone units)
    weights_prequantized: bool = False  # kernels already hold ŵ (see state.materialize_weights)
    observe_acts: bool = False          # fold inputs into stateful activation quantizers (calibration pass)
    report_errors: bool = False         # sow each Linear input's quantization error (for reports)
    blockwise_attention: bool = True
    # 16-bit dtype of quantized Linears' operands (x̂, ŵ): auto = float16 on GPUs (the official fp16 autocast: bf16
    # keeps 8 significant bits and rounds an 8-bit code by up to 0.6 of a step), the compute dtype elsewhere
    # (TPUs keep bfloat16); or float16 | bfloat16 | compute. Float32 programs always keep float32.
    operand_dtype: str = "auto"

    def __post_init__(self):
        if self.operand_dtype not in OPERAND_DTYPES:
            raise ValueError(f"operand_dtype must be one of {OPERAND_DTYPES}, got {self.operand_dtype!r}")
        for name in ("w_bits", "a_bits"):
            try:
                quantizers.check_bits(getattr(self, name))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        object.__setattr__(self, "fp_modules", tuple(self.fp_modules))
        object.__setattr__(self, "rules", tuple(rules_lib.as_rule(r) for r in self.rules))
        table = self.table
        registry.check_names({r.weight_quantizer for r in table if r.weight_quantizer},
                             {r.act_quantizer for r in table if r.act_quantizer})

    # --- the table -----------------------------------------------------------------------------------------------
    @property
    def table(self) -> tuple:
        """The whole ordered rule table: user rules, then the shorthands' expansion."""
        return self.rules + rules_lib.shorthand_rules(self.w_bits, self.a_bits, weights=self.weights,
                                                      acts=self.acts, attn=self.attn,
                                                      shift_and_sum=self.shift_and_sum, fp_modules=self.fp_modules)

    def rule_for(self, path: str) -> SiteRule:
        """Every setting of the site at `path` (relative to `prefix`): the one lookup every stage asks."""
        return rules_lib.resolve(self.table, rules_lib.join(self.prefix, path))

    def module_rule(self, module) -> SiteRule:
        return self.rule_for("/".join(module.scope.path))

    def check(self, var_cfg) -> "QuantPolicy":
        """ValueError if a rule (user or fp_modules) matches no site of the model, or a site cannot be resolved."""
        sites = rules_lib.model_sites(var_cfg)
        rules_lib.check_rules(self.table, [s.path for s in sites])
        for s in sites:
            r = self.rule_for(s.path)
            if s.kind == rules_lib.LINEAR:
                r.weight_group(s.in_features)
                r.act_spec(s.name, s.in_features)
        return self

    def bind(self, prefix: str, rel_paths: Sequence[str]) -> "QuantPolicy":
        """The policy for a module at `prefix` applied on its own (a reconstruction unit, a scanned block): its
        sites' resolved settings as exact rules over the relative paths, so that units whose sites resolve
        alike compare equal (and share one compiled program) wherever they sit in the model."""
        bound = tuple(self.rule_for(rules_lib.join(prefix, rel)).as_rule(rel) for rel in rel_paths)
        return dataclasses.replace(self, rules=bound, fp_modules=(), prefix="")

    def to_dict(self) -> dict:
        return {"class": type(self).__name__, "w_bits": self.w_bits, "a_bits": self.a_bits, "weights": self.weights,
                "acts": self.acts, "attn": self.attn, "shift_and_sum": self.shift_and_sum,
                "fp_modules": list(self.fp_modules), "rules": [r.to_dict() for r in self.rules],
                "table": [r.to_dict() for r in self.table]}

    @classmethod
    def from_dict(cls, d: dict, **changes) -> "QuantPolicy":
        """A policy from `to_dict` (or a quantized checkpoint written before the rule table: its global fields)."""
        fields = {k: d[k] for k in ("w_bits", "a_bits", "weights", "acts", "attn", "shift_and_sum") if k in d}
        fields["fp_modules"] = tuple(d.get("fp_modules", ()))
        fields["rules"] = tuple(Rule.from_dict(r) for r in d.get("rules", ()))
        return cls(**fields, **changes)

    # --- inference -----------------------------------------------------------------------------------------------
    def for_inference(self) -> "QuantPolicy":
        """Weights quantized once per sampling call instead of at every scale (soft rounding stays as is)."""
        if self.phase != "soft":
            return dataclasses.replace(self, weights_prequantized=True)
        return self

    def prepare_params(self, var_params, quant):
        """Kernels quantized once (each site at its rule); α is then spent and left out of the blocks' state."""
        if not self.weights_prequantized:
            return var_params, quant
        with jax.named_scope("weight_quant"):
            w_hat = state.materialize_weights(var_params, quant,
                                              dataclasses.replace(self, weights_prequantized=False))
        return w_hat, state.without_alpha(quant)

    # --- Linear --------------------------------------------------------------------------------------------------
    def quantized_kernel(self, module, kernel, rule: SiteRule):
        """ŵ of the module's kernel under its rule and this policy's phase."""
        if self.weights_prequantized:
            return kernel
        delta, zp = module.get_variable("quant", "delta"), module.get_variable("quant", "zero_point")
        if delta is None:
            raise ValueError(f"no 'quant' state for {rules_lib.join(self.prefix, '/'.join(module.scope.path))}: "
                             f"build it with varq_jax.quant.state.init_quant_state")
        alpha = module.get_variable("quant", "alpha") if rule.rounding == "adaround" else None
        if self.phase == "nearest" or rule.rounding == "nearest" or (self.phase == "hard" and alpha is None):
            return quantizers.fake_quant_weight(kernel, delta, zp, rule.w_bits)
        if alpha is None:
            raise ValueError(f"soft rounding of {'/'.join(module.scope.path) or 'the layer'} needs AdaRound alpha "
                             f"in its 'quant' state")
        return quantizers.adaround_weight(kernel, alpha, delta, zp, rule.w_bits, soft=self.phase == "soft")

    def quantized_input(self, module, x, rule: SiteRule, in_features: int):
        name, group = rule.act_spec(module.site, in_features)
        q = registry.act_quantizer(name)
        state = None
        if q.stateful:
            state = module.get_variable("quant", "act")
            if state is None:
                raise ValueError(f"activation quantizer {name!r} of {'/'.join(module.scope.path) or 'the layer'} "
                                 f"needs its calibrated state: build it with init_quant_state")
            if self.observe_acts:
                state = q.observe(jax.lax.stop_gradient(x), state)
                module.put_variable("quant", "act", state)
        return q.fn(x, rule.a_bits, group, state)

    def dense(self, module, x, kernel, bias):
        rule = self.module_rule(module)
        if rule.weights:
            kernel = self.quantized_kernel(module, kernel, rule)
        if rule.acts:
            xf = x.astype(jnp.float32)
            with jax.named_scope("act_quant"):
                x = self.quantized_input(module, xf, rule, kernel.shape[0])
            if self.report_errors:
                module.sow("intermediates", "act_err", jnp.stack([jnp.sum(jnp.square(x - xf)), jnp.sum(jnp.square(xf))]))
        if rule.weights or rule.acts:
            return dense(x, kernel, bias, self.operands(module.dtype), module.out_dtype or module.dtype)
        return dense(x, kernel, bias, module.dtype, module.out_dtype)

    def operands(self, compute_dtype):
        """The dtype quantized operands enter a 16-bit program's matmul in (see `operand_dtype`)."""
        compute = jnp.dtype(compute_dtype)
        if compute not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or self.operand_dtype == "compute":
            return compute
        if self.operand_dtype == "auto":
            return jnp.dtype(jnp.float16) if jax.default_backend() == "gpu" else compute
        return jnp.dtype(self.operand_dtype)

    # --- attention -----------------------------------------------------------------------------------------------
    def attention_kernel(self) -> dict:
        """How `sas_attention` runs under this policy (the simulation: XLA; see execution.IntegerPolicy)."""
        return {}

    def attention(self, module, q, k, v, scale):
        rule = self.module_rule(module)
        theta = module.get_variable("quant", "theta")
        out, attn_mean = sas_attention(q, k, v, scale, a_bits=rule.a_bits, theta=1.0 if theta is None else theta,
                                       quantize_qk=rule.attn, quantize_av=rule.attn,
                                       shift_and_sum=rule.shift_and_sum, **self.attention_kernel())
        module.sow("intermediates", "attn_mean", attn_mean)     # θ statistics; a no-op unless collected
        return out
