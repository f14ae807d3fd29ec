"""Calibrated activation-quantizer state: a registered quantizer that declares state (init_state/observe) has it
folded over the calibration set by one teacher-forced pass per batch, before θ and reconstruction.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from varq_jax.models.var import VAR, VARConfig
from varq_jax.models.vqvae import VQVAEConfig
from varq_jax.quant.capture import _chunks, _doubled_inputs, check_calibration
from varq_jax.quant.policy import QuantPolicy


@functools.partial(jax.jit, static_argnames=("vae_cfg", "var_cfg", "policy"))
def _observe_batch(vae_cfg, var_cfg, policy, params, quant, labels, tokens):
    labels2, x2 = _doubled_inputs(vae_cfg, var_cfg, params, labels, tokens)
    model = VAR(var_cfg, jnp.float32, dataclasses.replace(policy, observe_acts=True))
    _, updated = model.apply({"params": params["var"], "quant": quant}, labels2, x2, mutable=["quant"])
    return updated["quant"]


def observe_activations(vae_cfg: VQVAEConfig, var_cfg: VARConfig, params: dict, quant: dict, policy: QuantPolicy,
                        labels, tokens, *, batch_size: int = 8) -> dict:
    """The quant tree with every stateful activation quantizer's state folded over the calibration set: one
    teacher-forced (CFG-doubled) forward per batch with the policy observing its inputs (`observe` per batch)."""
    labels, tokens = check_calibration(var_cfg, labels, tokens)
    for idx, keep in _chunks(labels.shape[0], batch_size):
        idx = idx[:keep]
        quant = _observe_batch(vae_cfg, var_cfg, policy, params, quant, jnp.asarray(labels[idx]),
                               [jnp.asarray(t[idx]) for t in tokens])
    return quant
