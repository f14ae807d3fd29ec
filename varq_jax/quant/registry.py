"""Quantizers by name, so that a rule table (and the checkpoint that stores it) names them as data.

A weight quantizer calibrates the uniform grid of a Linear's kernel: `init(kernel [in, out], bits, group)` returns
at least `delta` and `zero_point` ([1, out] per output channel, [in/g, 1, out] per group), the state that
round-to-nearest, AdaRound and integer codes all use; extra entries are kept beside them in 'quant'.

An activation quantizer is `fn(x [..., C] float32, bits, group, state) -> x̂` (dynamic when `init_state` is None).
A quantizer with calibrated state declares it: `init_state(in_features, bits, group)` gives its initial tree, kept
in the Linear's 'quant' variables under 'act' (saved, loaded, fingerprinted with the rest), and `observe(x, state)`
folds one calibration batch into it (the pipeline's activation-calibration pass).
"""
import dataclasses
from typing import Callable, Optional

from varq_jax.quant import quantizers


@dataclasses.dataclass(frozen=True)
class WeightQuantizer:
    name: str
    init: Callable          # (kernel, bits, group_size) -> {'delta', 'zero_point', ...}


@dataclasses.dataclass(frozen=True)
class ActQuantizer:
    name: str
    fn: Callable                          # (x, bits, group_size, state) -> x̂
    init_state: Optional[Callable] = None  # (in_features, bits, group_size) -> state tree
    observe: Optional[Callable] = None     # (x, state) -> state

    @property
    def stateful(self) -> bool:
        return self.init_state is not None


WEIGHT_QUANTIZERS: dict = {}
ACT_QUANTIZERS: dict = {}


def register_weight_quantizer(name: str, init: Callable, *, overwrite: bool = False) -> WeightQuantizer:
    """Registers `init(kernel, bits, group_size) -> {'delta', 'zero_point', ...}` under `name`."""
    return _register(WEIGHT_QUANTIZERS, WeightQuantizer(name, init), overwrite)


def register_act_quantizer(name: str, fn: Callable, *, init_state: Optional[Callable] = None,
                           observe: Optional[Callable] = None, overwrite: bool = False) -> ActQuantizer:
    """Registers an activation quantizer `fn(x, bits, group_size, state) -> x̂` under `name` (see module doc)."""
    if (init_state is None) != (observe is None):
        raise ValueError(f"activation quantizer {name!r}: calibrated state needs both init_state and observe")
    return _register(ACT_QUANTIZERS, ActQuantizer(name, fn, init_state, observe), overwrite)


def _register(table: dict, q, overwrite: bool):
    if not isinstance(q.name, str) or not q.name or q.name == "auto":
        raise ValueError(f"a quantizer needs a name other than 'auto', got {q.name!r}")
    if q.name in table and not overwrite and table[q.name] != q:
        raise ValueError(f"a quantizer named {q.name!r} is already registered (pass overwrite=True to replace it)")
    table[q.name] = q
    return q


def weight_quantizer(name: str) -> WeightQuantizer:
    if name not in WEIGHT_QUANTIZERS:
        raise ValueError(f"weight quantizer {name!r} is not registered (registered: {', '.join(WEIGHT_QUANTIZERS)}); "
                         f"register it with varq_jax.quant.register_weight_quantizer before use or loading")
    return WEIGHT_QUANTIZERS[name]


def act_quantizer(name: str) -> ActQuantizer:
    if name not in ACT_QUANTIZERS:
        raise ValueError(f"activation quantizer {name!r} is not registered (registered: "
                         f"{', '.join(ACT_QUANTIZERS)}); register it with varq_jax.quant.register_act_quantizer "
                         f"before use or loading")
    return ACT_QUANTIZERS[name]


def check_names(weight_names, act_names) -> None:
    """ValueError naming the first unregistered quantizer ('auto' is the official choice, always known)."""
    for n in weight_names:
        weight_quantizer(n)
    for n in act_names:
        if n != "auto":
            act_quantizer(n)


# --- the built-ins (the official quantizers) ------------------------------------------------------------------------
def _minmax_init(kernel, bits, group_size):
    delta, zero_point = quantizers.weight_minmax_params(kernel, bits, group_size)
    return {"delta": delta, "zero_point": zero_point}


def _per_token(x, bits, group_size, state):
    return quantizers.quantize_act_per_token(x, bits)


def _per_group(x, bits, group_size, state):
    return quantizers.quantize_act_per_group(x, bits, group_size or quantizers.ACT_GROUP)


def _signed_split(x, bits, group_size, state):
    return quantizers.quantize_act_signed_split(x, bits, group_size)


register_weight_quantizer("minmax", _minmax_init)
register_act_quantizer("per_token", _per_token)
register_act_quantizer("per_group", _per_group)
register_act_quantizer("signed_split", _signed_split)
