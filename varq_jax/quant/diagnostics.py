"""The paper's two diagnostics of Shift-and-Sum PTQ on a model.

1. A·V reconstruction error per scale: on calibration token maps (teacher-forced, CFG-doubled, every other
   matmul in full precision), for every block and scale block, the relative L2 error of Â·V̂ against the FP A·V,
   with V quantized by shift-and-sum at θ and with plain rounding (Â: log2-quantized FP probabilities in both).
   The shift-and-sum error bound is 2^k times smaller for the tokens of order k (the paper's Theorem 1).
2. The calibration code-frequency mismatch (total variation per scale) before and after resampling, which the
   PTQ report records.
"""
import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from varq_jax.checkpoint import ModelCheckpoint
from varq_jax.models.var import VAR
from varq_jax.models.vqvae import VQVAE
from varq_jax.quant import state
from varq_jax.quant.policy import QuantPolicy
from varq_jax.quant.sas_attention import attend_values, attention_logits

AV_ERROR = "av_sq_err"      # sown per attention call: [Σ(sas − fp)², Σ(plain − fp)², Σ fp²]


@dataclasses.dataclass(frozen=True)
class AVErrorPolicy(QuantPolicy):
    """Full-precision forward that measures, at every attention call, how far the quantized A·V lands from the FP
    one. The returned attention output is the FP one, so every later activation stays FP. θ is read from the
    attention module's 'quant' variables."""
    weights: bool = False
    acts: bool = False

    def attention(self, module, q, k, v, scale):
        theta = module.get_variable("quant", "theta")
        if theta is None:
            raise ValueError(f"no θ for {'/'.join(module.scope.path)}: pass it in the 'quant' collection")
        a_bits = self.module_rule(module).a_bits
        logits = attention_logits(q.astype(jnp.float32) * scale, k, a_bits, quantize=False)
        probs = jax.nn.softmax(logits, axis=-1)
        fp, _ = attend_values(probs, v, a_bits, quantize=False)
        sas, _ = attend_values(probs, v, a_bits, theta, quantize=True, shift_and_sum=True)
        plain, _ = attend_values(probs, v, a_bits, quantize=True, shift_and_sum=False)
        module.sow("intermediates", AV_ERROR, jnp.stack([jnp.sum(jnp.square(sas - fp)),
                                                         jnp.sum(jnp.square(plain - fp)), jnp.sum(jnp.square(fp))]))
        return fp.astype(q.dtype)


def theta_tree(var_params, theta: float) -> dict:
    """A 'quant' collection holding only θ for every attention module."""
    flat = traverse_util.flatten_dict(var_params)
    attn = sorted({p[:-2] for p in flat if len(p) >= 2 and p[-2] == "mat_qkv"})
    return traverse_util.unflatten_dict({p + ("theta",): jnp.asarray(theta, jnp.float32) for p in attn})


@functools.partial(jax.jit, static_argnums=(0, 1))
def _av_sums(vae, var, params, quant, labels, tokens):
    """[depth, scales, 3] squared-error sums of one batch (CFG-doubled: labels, then the null class)."""
    x = vae.apply({"params": params["vae"]}, tokens, method=VQVAE.idx_to_var_input)
    both = jnp.concatenate([labels, jnp.full_like(labels, var.cfg.num_classes)])
    _, sown = var.apply({"params": params["var"], "quant": quant}, both, jnp.concatenate([x, x]),
                        mutable=["intermediates"])
    inter = sown["intermediates"]
    return jnp.stack([jnp.stack(inter[f"blocks_{i}"]["attn"][AV_ERROR]) for i in range(var.cfg.depth)])


def av_error_sums(ck: ModelCheckpoint, labels, tokens: Sequence, a_bits: int, theta: float,
                  batch_size: int = 8, dtype=jnp.float32) -> np.ndarray:
    """Per block and scale [depth, scales, 3]: Σ(Â·V̂_sas − A·V)², Σ(Â·V̂_plain − A·V)², Σ(A·V)²
    over the calibration samples (labels [N], tokens per scale [N, pn²])."""
    cfg = ck.var_cfg
    labels = np.asarray(labels, np.int32)
    if len(tokens) != cfg.num_scales:
        raise ValueError(f"need token maps for {cfg.num_scales} scales, got {len(tokens)}")
    n = len(labels)
    for s, (t, pn) in enumerate(zip(tokens, cfg.patch_nums)):
        if tuple(np.shape(t)) != (n, pn * pn):
            raise ValueError(f"tokens of scale {s} must be [{n}, {pn * pn}], got {np.shape(t)}")
    if n == 0 or batch_size <= 0:
        raise ValueError("need at least one calibration sample and a positive batch size")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta}")
    policy = AVErrorPolicy(w_bits=8, a_bits=a_bits)               # w_bits unused: weights stay FP
    quant = theta_tree(ck.params["var"], theta)
    vae, var = VQVAE(ck.vae_cfg), VAR(cfg, dtype, policy)
    total = np.zeros((cfg.depth, cfg.num_scales, 3), np.float64)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        total += np.asarray(_av_sums(vae, var, ck.params, quant, jnp.asarray(labels[idx]),
                                     [jnp.asarray(np.asarray(t)[idx]) for t in tokens]), np.float64)
    return total


def av_error(ck: ModelCheckpoint, labels, tokens: Sequence, a_bits: int, theta: float,
             batch_size: int = 8, dtype=jnp.float32) -> dict:
    """Relative L2 error of Â·V̂ against A·V per scale (blocks summed: √(Σ err²) / √(Σ ref²)), with
    shift-and-sum at θ and with plain rounding. Returns {"shift_and_sum": [...], "plain": [...], "a_bits", "theta",
    "num_samples", "sums": [depth][scales][3]}."""
    sums = av_error_sums(ck, labels, tokens, a_bits, theta, batch_size, dtype)
    per_scale = sums.sum(axis=0)
    ref = np.maximum(per_scale[:, 2], 1e-30)
    return {"a_bits": int(a_bits), "theta": float(theta), "num_samples": int(len(labels)),
            "shift_and_sum": [float(x) for x in np.sqrt(per_scale[:, 0] / ref)],
            "plain": [float(x) for x in np.sqrt(per_scale[:, 1] / ref)],
            "sums": sums.tolist()}


def model_theta(quant: dict) -> float:
    """The (single) θ of a quantized model's 'quant' collection."""
    theta = state.get_theta(quant)
    if not theta > 0:
        raise ValueError(f"the model has no single positive θ (got {theta})")
    return theta


def frequency_mismatch(report: dict) -> Optional[dict]:
    """{"before": [...], "after": [...]} per scale from a PTQ report (None when the run did not resample)."""
    fm = report.get("frequency_mismatch")
    if not fm:
        return None
    if set(fm) != {"before", "after"} or len(fm["before"]) != len(fm["after"]):
        raise ValueError(f"malformed frequency_mismatch in the report: {fm!r}")
    return {"before": [float(x) for x in fm["before"]], "after": [float(x) for x in fm["after"]]}



# --- what reconstruction did: learned roundings, and the whole model's distance to FP -----------------------------
def rounding_flips(fp_var_params: dict, q: ModelCheckpoint, prefix: str = "") -> dict:
    """{site: fraction of its weights whose code differs from round-to-nearest} for the coded Linears of a loaded
    quantized checkpoint `q` (its kernels are the dequantized learned codes) in the unit `prefix` (a path: "head"
    is not "head_nm"; "" = every site)."""
    out = {}
    flat_fp = traverse_util.flatten_dict(fp_var_params)
    flat_q = traverse_util.flatten_dict(q.params["var"])
    for path, node in _quant_nodes(q.quant):
        name = "/".join(path)
        inside = not prefix or name == prefix or name.startswith(prefix.rstrip("/") + "/")
        if not inside or "delta" not in node or path + ("kernel",) not in flat_fp:
            continue
        rule = q.policy.rule_for(name)
        if not rule.weights:
            continue
        nearest = state.integer_codes(flat_fp[path + ("kernel",)], node, rule.w_bits, learned=False)
        learned = state.integer_codes(flat_q[path + ("kernel",)], node, rule.w_bits, learned=False)
        out[name] = float(jnp.mean(nearest != learned))
    return out


def _quant_nodes(quant: dict, path: tuple = ()):
    if "delta" in quant:
        yield path, quant
        return
    for k, v in quant.items():
        if isinstance(v, dict):
            yield from _quant_nodes(v, path + (k,))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _kl_sum(vae, var_fp, var_q, params_fp, params_q, quant, labels, tokens):
    x = vae.apply({"params": params_fp["vae"]}, tokens, method=VQVAE.idx_to_var_input)
    logp = jax.nn.log_softmax(var_fp.apply({"params": params_fp["var"]}, labels, x).astype(jnp.float32), -1)
    logq = jax.nn.log_softmax(var_q.apply({"params": params_q["var"], "quant": quant}, labels, x)
                              .astype(jnp.float32), -1)
    return jnp.sum(jnp.exp(logp) * (logp - logq)), logp.shape[0] * logp.shape[1]


def teacher_forced_kl(fp: ModelCheckpoint, q: ModelCheckpoint, labels, tokens: Sequence, batch_size: int = 16,
                      dtype=jnp.float32) -> float:
    """Mean KL(FP ‖ quantized) of the next-token distributions over every token of the given token maps,
    teacher-forced with the true labels (no CFG, no top-k/top-p): how far the whole quantized model is from FP."""
    vae = VQVAE(fp.vae_cfg, jnp.float32)
    var_fp, var_q = VAR(fp.var_cfg, dtype), VAR(fp.var_cfg, dtype, q.policy)
    labels = np.asarray(labels)
    n, bs = len(labels), min(batch_size, len(labels))
    total, count = 0.0, 0
    for start in range(0, n - bs + 1, bs):
        s, c = _kl_sum(vae, var_fp, var_q, fp.params, q.params, q.quant, jnp.asarray(labels[start:start + bs]),
                       [jnp.asarray(t)[start:start + bs] for t in tokens])
        total, count = total + float(s), count + int(c)
    return total / count
