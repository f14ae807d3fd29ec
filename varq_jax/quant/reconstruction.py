"""BRECQ/AdaRound reconstruction of one unit: learn the rounding α of its Linears so its quantized output matches FP.

The official `block_reconstruction` / `layer_reconstruction`, as one compiled `lax.scan` per unit:
  * loss = Σ_scales mean_(rows, tokens of the scale) Σ_channels |ŷ − y|^p  (`lp_loss` per scale, summed)
         + λ·Σ_α (1 − |2h(α) − 1|^β) over the unit's Linears,
    β from LinearTempDecay: b_range[0] until `warmup`·iters, then linear to b_range[1] at the last iteration
    (iteration t counts from 1); the regulariser is off while t < warmup·iters (the official default warmup is 0);
  * Adam (torch defaults) on α with lr cosine-annealed to 0 over `iters` steps;
  * the unit runs standalone with the caller's policy in soft AdaRound mode: weights, Linear inputs and both
    attention matmuls (shift-and-sum V with the unit's θ) are quantized as the policy says — the official sets
    the block's quant state to (weights on, activations on) during reconstruction; attention is evaluated per
    scale block, so queries of scale s see the keys of scales ≤ s as with the official KV cache;
  * each iteration draws `batch_size` rows with replacement from the captured rows (the official
    `torch.randint(0, rows, (batch_size,))`, where a sample's label and null rows are separate rows), or
    `batch_size` samples with both CFG rows (`batch_unit="samples"`).
After the loop the unit is used with hard rounding, 1[α ≥ 0] (policy phase "hard"). Which Linears learn their
rounding, at which bits and granularity, is the rule of each site's full path (`QuantPolicy.rule_for`).
"""
import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from varq_jax.models.var import VARConfig
from varq_jax.models.vqvae import VQVAEConfig
from varq_jax.quant import quantizers, recon_state
from varq_jax.quant.capture import BlockStream, Captured, capture, check_calibration
from varq_jax.quant.units import (ModuleSpec, ReconTarget, partial_model_policy, recon_targets, replace_subtree,
                                  segments, standalone_policy, subtree, trainable_linears)
from varq_jax.quant.policy import QuantPolicy
from varq_jax.fingerprint import describe, differences, fingerprint

Array = jax.Array
BATCH_UNITS = ("rows", "samples")


@dataclasses.dataclass(frozen=True)
class ReconConfig:
    """Reconstruction settings; defaults: the official README runs (`--lr 1e-4 --weight 1e-5`), 5000 iters, batch 4."""
    iters: int = 5000
    batch_size: int = 4
    batch_unit: str = "rows"           # rows (official) | samples (both CFG rows of each drawn sample)
    lr: float = 1e-4
    weight: float = 1e-5               # λ of the rounding regulariser
    p: float = 2.0
    b_range: tuple = (20.0, 2.0)
    warmup: float = 0.0                # fraction of iters with the regulariser off and β held at b_range[0]
    log_every: int = 100               # loss-curve stride kept in the records
    dtype: str = "float32"             # compute dtype of the unit (the official reconstructs in float32)
    quantized_inputs: bool = False     # inputs from the partly reconstructed quantized model (outputs stay FP)
    capture_batch: int = 8             # calibration samples per compiled capture forward
    store_dtype: str = "float32"       # dtype of the cached inputs/outputs
    eval_rows: int = 64                # rows per compiled chunk when measuring a unit's error on all data
    measure_errors: bool = True        # record the unit's error with nearest and with learned (hard) rounding
    units: tuple = ()                  # unit names to reconstruct (e.g. ("blocks_0/ffn", "head")); () = all
    chunk_iters: int = 500             # iterations per compiled scan between progress reports (0: one scan)

    def __post_init__(self):
        if isinstance(self.chunk_iters, bool) or not isinstance(self.chunk_iters, int) or self.chunk_iters < 0:
            raise ValueError(f"chunk_iters must be an int >= 0, got {self.chunk_iters!r}")
        for name in ("iters", "batch_size", "log_every", "capture_batch", "eval_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.batch_unit not in BATCH_UNITS:
            raise ValueError(f"batch_unit must be one of {BATCH_UNITS}, got {self.batch_unit!r}")
        if not self.lr > 0 or not self.weight >= 0 or not self.p > 0:
            raise ValueError(f"need lr > 0, weight >= 0, p > 0; got {self.lr}, {self.weight}, {self.p}")
        if len(self.b_range) != 2 or not all(b > 0 for b in self.b_range):
            raise ValueError(f"b_range must be two positive numbers (start, end), got {self.b_range!r}")
        object.__setattr__(self, "b_range", tuple(float(b) for b in self.b_range))   # hashable: a jit static
        object.__setattr__(self, "units", tuple(self.units))
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        for name in ("dtype", "store_dtype"):
            try:
                object.__setattr__(self, name, jnp.dtype(getattr(self, name)).name)
            except TypeError as e:
                raise ValueError(f"{name} {getattr(self, name)!r} is not a dtype") from e

    def optimisation_only(self) -> "ReconConfig":
        """This config with the fields the compiled loop ignores set to defaults (fewer recompilations)."""
        return dataclasses.replace(self, log_every=1, quantized_inputs=False, capture_batch=1,
                                   store_dtype="float32", eval_rows=1, measure_errors=False, units=(),
                                   chunk_iters=0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["b_range"] = list(self.b_range)
        d["units"] = list(self.units)
        return d


# --- schedules and loss --------------------------------------------------------------------------------------------
def beta_at(rc: ReconConfig, t) -> Array:
    """The official LinearTempDecay at iteration t (1-based), decay starting at warmup·iters."""
    start_b, end_b = rc.b_range
    t0 = rc.warmup * rc.iters
    rel = (jnp.asarray(t, jnp.float32) - t0) / (rc.iters - t0)
    decayed = end_b + (start_b - end_b) * jnp.maximum(0.0, 1.0 - rel)
    return jnp.where(t < t0, jnp.float32(start_b), decayed)


def regularizer_on(rc: ReconConfig, t) -> Array:
    """1.0 from iteration warmup·iters on (the official `count < loss_start` switch), else 0.0."""
    return (jnp.asarray(t, jnp.float32) >= rc.warmup * rc.iters).astype(jnp.float32)


def token_weights(segs: tuple, num_tokens: int) -> np.ndarray:
    """[T] weights 1/(tokens of the scale): Σ_t w_t e_t = Σ_scales mean over the scale's tokens."""
    w = np.zeros(num_tokens, np.float32)
    for s, e in segs:
        w[s:e] = 1.0 / (e - s)
    if segs[-1][1] != num_tokens:
        raise ValueError(f"scale segments end at {segs[-1][1]} but the data has {num_tokens} tokens")
    return w


def row_losses(pred: Array, target: Array, weights: Array, p: float) -> Array:
    """Per-row official loss [rows]: Σ_scales mean_tokens Σ_channels |ŷ − y|^p (the batch mean is the caller's)."""
    err = jnp.sum(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)) ** p, axis=-1)
    return jnp.sum(err * weights, axis=-1)


# --- α trees -------------------------------------------------------------------------------------------------------
def init_module_alpha(module_params: dict, module_quant: dict, rel_paths) -> dict:
    """{rel_path…: {'alpha': α}} with h(α) = frac(w/Δ) for the given module-relative Linears."""
    flat = {}
    for rel in rel_paths:
        kernel, node = subtree(module_params, rel)["kernel"], subtree(module_quant, rel)
        flat[rel + ("alpha",)] = quantizers.adaround_init_alpha(kernel, node["delta"])
    return traverse_util.unflatten_dict(flat) if flat else {}


def with_alpha(quant: dict, alpha: dict) -> dict:
    """The quant tree with α entries added (or replaced)."""
    flat = dict(traverse_util.flatten_dict(quant)) if quant else {}
    flat.update(traverse_util.flatten_dict(alpha))
    return traverse_util.unflatten_dict(flat)


def draw_batch(key, inputs: Array, outputs: Array, rc: ReconConfig):
    """One iteration's (x, y) [rows, T, C]: `batch_size` rows drawn with replacement from all N·R captured rows,
    or (batch_unit "samples") `batch_size` samples with replacement, each with all its R rows, sample-major."""
    n, r = inputs.shape[:2]
    if rc.batch_unit == "rows":
        idx = jax.random.randint(key, (rc.batch_size,), 0, n * r)
        flat = lambda a: a.reshape(n * r, *a.shape[2:])[idx]
    else:
        idx = jax.random.randint(key, (rc.batch_size,), 0, n)
        flat = lambda a: a[idx].reshape(rc.batch_size * r, *a.shape[2:])
    return flat(inputs), flat(outputs)


# --- the compiled loop -----------------------------------------------------------------------------------------------
def _adam(rc: ReconConfig):
    return optax.adam(optax.cosine_decay_schedule(rc.lr, rc.iters))


def _step_fn(spec: ModuleSpec, var_cfg: VARConfig, policy: QuantPolicy, rc: ReconConfig, segs: tuple,
             module_params: dict, module_quant: dict, inputs: Array, outputs: Array):
    """One AdaRound iteration as a `lax.scan` body over (t, key): carry (α, Adam state), outputs (rec, reg)."""
    module = spec.build(var_cfg, jnp.dtype(rc.dtype), policy)
    weights = jnp.asarray(token_weights(segs, inputs.shape[2]))
    opt = _adam(rc)

    def loss_fn(alpha, x, y, t):
        pred = spec.apply(module, module_params, with_alpha(module_quant, alpha), x)
        rec = jnp.mean(row_losses(pred, y, weights, rc.p))
        beta = beta_at(rc, t)
        reg = sum(quantizers.adaround_regularizer(a, beta) for a in jax.tree.leaves(alpha))
        reg = rc.weight * regularizer_on(rc, t) * reg
        return rec + reg, (rec, reg)

    def step(carry, xs):
        alpha, opt_state = carry
        t, k = xs
        x, y = draw_batch(k, inputs, outputs, rc)
        (_, (rec, reg)), grads = jax.value_and_grad(loss_fn, has_aux=True)(alpha, x, y, t)
        updates, opt_state = opt.update(grads, opt_state, alpha)
        return (optax.apply_updates(alpha, updates), opt_state), (rec, reg)
    return step


@functools.partial(jax.jit, static_argnames=("spec", "var_cfg", "policy", "rc", "segs"))
def optimize_alpha(spec: ModuleSpec, var_cfg: VARConfig, policy: QuantPolicy, rc: ReconConfig, segs: tuple,
                   module_params: dict, module_quant: dict, alpha0: dict, inputs: Array, outputs: Array, key):
    """All `rc.iters` AdaRound steps of one unit in one `lax.scan`. `policy` is the unit's standalone policy in soft
    mode. Returns (α, per-iteration reconstruction loss [iters], per-iteration λ·regulariser [iters])."""
    step = _step_fn(spec, var_cfg, policy, rc, segs, module_params, module_quant, inputs, outputs)
    ts = jnp.arange(1, rc.iters + 1)
    (alpha, _), (rec, reg) = jax.lax.scan(step, (alpha0, _adam(rc).init(alpha0)),
                                          (ts, jax.random.split(key, rc.iters)))
    return alpha, rec, reg


@functools.partial(jax.jit, static_argnames=("spec", "var_cfg", "policy", "rc", "segs"))
def _optimize_chunk(spec, var_cfg, policy, rc, segs, module_params, module_quant, alpha, opt_state, ts, keys,
                    inputs, outputs):
    step = _step_fn(spec, var_cfg, policy, rc, segs, module_params, module_quant, inputs, outputs)
    (alpha, opt_state), (rec, reg) = jax.lax.scan(step, (alpha, opt_state), (ts, keys))
    return alpha, opt_state, rec, reg


def optimize_alpha_chunked(spec: ModuleSpec, var_cfg: VARConfig, policy: QuantPolicy, rc: ReconConfig, segs: tuple,
                           module_params: dict, module_quant: dict, alpha0: dict, inputs: Array, outputs: Array, key,
                           chunk: int, progress: Optional[Callable[[int, float], Any]] = None):
    """`optimize_alpha` as scans of `chunk` iterations (the same iterations, keys and schedules), with
    `progress(iterations done, last reconstruction loss)` between chunks: host work between compiled loops, so
    whole-loop CUDA graphs stay intact."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of iterations, got {chunk}")
    ts, keys = jnp.arange(1, rc.iters + 1), jax.random.split(key, rc.iters)
    alpha, opt_state, recs, regs = alpha0, _adam(rc).init(alpha0), [], []
    for s in range(0, rc.iters, chunk):
        e = min(s + chunk, rc.iters)
        alpha, opt_state, rec, reg = _optimize_chunk(spec, var_cfg, policy, rc, segs, module_params, module_quant,
                                                     alpha, opt_state, ts[s:e], keys[s:e], inputs, outputs)
        recs.append(rec)
        regs.append(reg)
        if progress is not None:
            progress(e, float(rec[-1]))
    return alpha, jnp.concatenate(recs), jnp.concatenate(regs)


SATURATED = 100.0    # h(±100) is exactly 1 / 0 in float32: soft rounding with such α is hard rounding


def rounding_alpha(module_params: dict, module_quant: dict, rel_paths, rounding: str) -> dict:
    """α trees under which *soft* AdaRound computes exactly the given rounding of each Linear: nearest
    (α = ±100 by round(w/Δ) > floor(w/Δ), ties to even as `round`), hard (±100 by α ≥ 0) or soft (α itself).
    One compiled soft-mode evaluation then measures all three."""
    flat = {}
    for rel in rel_paths:
        kernel, node = subtree(module_params, rel)["kernel"], subtree(module_quant, rel)
        if rounding == "nearest":
            delta = node["delta"]
            g = kernel.astype(jnp.float32).reshape((delta.shape[0], -1, kernel.shape[1]) if delta.ndim == 3
                                                   else kernel.shape) / delta
            up = (jnp.round(g) > jnp.floor(g)).reshape(kernel.shape)
        elif "alpha" not in node:
            raise ValueError(f"{rounding} rounding needs alpha for {'/'.join(rel) or 'the layer'}")
        elif rounding == "hard":
            up = node["alpha"] >= 0
        else:
            flat[rel + ("alpha",)] = node["alpha"]
            continue
        flat[rel + ("alpha",)] = jnp.where(up, SATURATED, -SATURATED)
    return traverse_util.unflatten_dict(flat) if flat else {}


@functools.partial(jax.jit, static_argnames=("spec", "var_cfg", "policy", "dtype", "segs", "p"))
def _error_sum(spec, var_cfg, policy, dtype, segs, p, module_params, module_quant, x, y, valid):
    module = spec.build(var_cfg, jnp.dtype(dtype), policy)
    pred = spec.apply(module, module_params, module_quant, x)
    return jnp.sum(row_losses(pred, y, jnp.asarray(token_weights(segs, x.shape[1])), p) * valid)


def module_error(var_cfg: VARConfig, target: ReconTarget, module_params: dict, module_quant: dict, data: Captured,
                 policy: Optional[QuantPolicy], rounding: str, rc: ReconConfig = ReconConfig()) -> float:
    """The official loss (without regulariser) averaged over every captured row, with the unit quantized by
    `policy` at the given weight rounding (nearest | soft | hard; the last two read α from module_quant);
    `policy=None` runs it in full precision."""
    if rounding not in ("nearest", "soft", "hard"):
        raise ValueError(f"rounding must be nearest, soft or hard, got {rounding!r}")
    if policy is not None:
        alpha = rounding_alpha(module_params, module_quant, trainable_linears(policy, target, module_params),
                               rounding)
        module_quant = with_alpha(module_quant, alpha)
        policy = standalone_policy(policy, target, module_params, phase="soft")
    segs = segments(var_cfg, target)
    x = data.inputs.reshape(-1, *data.inputs.shape[2:])
    y = data.outputs.reshape(-1, *data.outputs.shape[2:])
    rows = x.shape[0]
    chunk = min(rc.eval_rows, rows)
    total = 0.0
    for s in range(0, rows, chunk):
        idx = np.arange(s, s + chunk) % rows
        valid = jnp.asarray(np.arange(s, s + chunk) < rows, jnp.float32)
        total += float(_error_sum(target.spec, var_cfg, policy, rc.dtype, segs, rc.p, module_params,
                                  module_quant or None, x[idx], y[idx], valid))
    return total / rows


def reconstruct_module(var_cfg: VARConfig, target: ReconTarget, module_params: dict, module_quant: dict,
                       data: Captured, policy: QuantPolicy, rc: ReconConfig, key,
                       progress: Optional[Callable[[int, int, float], Any]] = None) -> tuple:
    """Learns α for the unit's quantized Linears. Returns (module quant tree with α, record dict).

    The record holds the loss curve (every `log_every` iterations), the first/last iteration's losses and, with
    `rc.measure_errors`, the unit's error on all calibration rows with nearest and with learned hard rounding.
    With `rc.chunk_iters` below `rc.iters` the loop runs in chunks and `progress(done, iters, loss)` is called after
    each (once at the end otherwise).
    """
    if data.inputs.shape[0] < 1 or data.inputs.shape[:3] != data.outputs.shape[:3]:
        raise ValueError(f"captured inputs {data.inputs.shape} and outputs {data.outputs.shape} do not match")
    segs = segments(var_cfg, target)
    rel_paths = trainable_linears(policy, target, module_params)
    record = {"module": target.name, "kind": target.spec.kind, "linears": ["/".join(r) for r in rel_paths]}
    if not rel_paths:
        record["skipped"] = "no Linear of the unit learns its rounding (rules: weights off or rounding 'nearest')"
        return module_quant, record
    if rc.measure_errors:
        record["error_nearest"] = module_error(var_cfg, target, module_params, module_quant, data, policy,
                                               "nearest", rc)
    soft = standalone_policy(policy, target, module_params, phase="soft")
    alpha0 = init_module_alpha(module_params, module_quant, rel_paths)
    start = time.perf_counter()
    args = (target.spec, var_cfg, soft, rc.optimisation_only(), segs, module_params, module_quant, alpha0,
            data.inputs, data.outputs, key)
    if rc.chunk_iters and rc.iters > rc.chunk_iters:
        report = None if progress is None else (lambda done, loss: progress(done, rc.iters, loss))
        alpha, rec, reg = optimize_alpha_chunked(*args, chunk=rc.chunk_iters, progress=report)
    else:
        alpha, rec, reg = optimize_alpha(*args)
        if progress is not None:
            progress(rc.iters, rc.iters, float(rec[-1]))
    rec, reg = np.asarray(rec), np.asarray(reg)
    record["optimize_seconds"] = time.perf_counter() - start      # the whole α loop (+ its compile, first of a kind)
    learned = with_alpha(module_quant, alpha)
    record.update(rec_loss_first=float(rec[0]), rec_loss_last=float(rec[-1]), round_loss_first=float(reg[0]),
                  round_loss_last=float(reg[-1]), curve_every=rc.log_every,
                  rec_loss_curve=[float(v) for v in rec[::rc.log_every]],
                  round_loss_curve=[float(v) for v in reg[::rc.log_every]])
    if rc.measure_errors:
        record["error_hard"] = module_error(var_cfg, target, module_params, learned, data, policy, "hard", rc)
    return learned, record


# --- the driver over all units ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class ReconResult:
    quant: dict            # the quant tree with learned α for every reconstructed Linear (use phase="hard")
    records: list          # one dict per unit, in order (see `reconstruct_module`), plus its wall time
    done: list             # names of the finished units


def _key_data(key) -> np.ndarray:
    """The raw uint32 data of a typed or legacy PRNG key (what the run's fingerprint records)."""
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.dtype != jnp.uint32:
        raise ValueError(f"key must be a PRNG key (jax.random.key or PRNGKey), got dtype {key.dtype}")
    return np.asarray(key)


def _check_quant(var_params: dict, quant: dict, targets: list, policy: QuantPolicy):
    for t in targets:
        mp, mq = subtree(var_params, t.path), subtree(quant, t.path) if _has(quant, t.path) else {}
        for rel in trainable_linears(policy, t, mp):
            node = subtree(mq, rel) if _has(mq, rel) else {}
            if "delta" not in node or "zero_point" not in node:
                raise ValueError(f"quant state of {'/'.join(t.path + rel)} lacks delta/zero_point: build it with "
                                 f"varq_jax.quant.state.init_quant_state")


def _has(tree: dict, path: tuple) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def reconstruct_model(vae_cfg: VQVAEConfig, var_cfg: VARConfig, params: dict, quant: dict, labels, tokens,
                      policy: QuantPolicy, rc: ReconConfig = ReconConfig(), *, key, workdir: Optional[str] = None,
                      units: Optional[Sequence[str]] = None,
                      callback: Optional[Callable[[dict, dict], Any]] = None,
                      progress: Optional[Callable[[str, int, int, float], Any]] = None) -> ReconResult:
    """BRECQ over the model: every unit (`recon_targets` order, or the named `units` in that order) is captured
    from the calibration set (labels [N], tokens per scale [N, pn²]), reconstructed, and its α written into the
    quant tree before the next unit starts.

    `quant` is the initial state (`init_quant_state`, θ set). Unit i draws its batches from fold_in(key, i), so a
    run's result does not depend on where it was interrupted. With `workdir` the state is saved after every unit
    and a new call with the same arguments continues after the last finished unit (a different configuration,
    calibration set, initial state or key is refused). `callback(record, quant)` runs after each unit is saved;
    `progress(unit, iterations done, iterations, loss)` after every chunk of a unit's loop.
    """
    all_targets = recon_targets(var_cfg)
    names = [t.name for t in all_targets]
    if units is None and rc.units:
        units = rc.units
    if units is not None:
        unknown = [u for u in units if u not in names]
        if unknown:
            raise ValueError(f"unknown reconstruction units {unknown}; valid: {', '.join(names)}")
    selected = [(i, t) for i, t in enumerate(all_targets) if units is None or t.name in units]
    if not any(trainable_linears(policy, t, subtree(params["var"], t.path)) for _, t in selected):
        raise ValueError("reconstruction learns weight rounding, but no Linear of the selected units has a rule "
                         "with weights quantized and rounding 'adaround'")
    labels, tokens = check_calibration(var_cfg, labels, tokens)
    _check_quant(params["var"], quant, [t for _, t in selected], policy)
    key_data = _key_data(key)
    run_fp = fingerprint(model=dataclasses.asdict(var_cfg), quant=policy.to_dict(), recon=rc.to_dict(),
                         units=[t.name for _, t in selected], key=key_data.tolist(), calibration_labels=labels,
                         calibration_tokens=tokens, initial_quant_state=quant)

    done, records = [], []
    saved = recon_state.load_latest(workdir) if workdir else None
    if saved is not None:
        old = saved["fingerprint"]
        if differences(old, run_fp):
            raise ValueError(f"{workdir!r} holds a reconstruction run made with other settings "
                             f"({describe(old, run_fp)}); use another workdir or the original arguments")
        quant = jax.tree.map(jnp.asarray, saved["quant"])
        done, records = saved["done"], saved["records"]

    input_policy = partial_model_policy(policy) if rc.quantized_inputs else None
    stream = None                   # FP inputs of block units: one block forward per block, not a model per unit
    for index, target in selected:
        if target.name in done:
            continue
        start = time.perf_counter()
        if input_policy is None and target.in_block:
            if stream is None:
                stream = BlockStream(vae_cfg, var_cfg, params, labels, tokens, batch_size=rc.capture_batch,
                                     dtype=jnp.dtype(rc.dtype), store_dtype=jnp.dtype(rc.store_dtype))
            data = stream.get(target)
        else:
            data = capture(vae_cfg, var_cfg, params, labels, tokens, target, batch_size=rc.capture_batch,
                           dtype=jnp.dtype(rc.dtype), input_policy=input_policy,
                           quant=quant if input_policy is not None else None, store_dtype=jnp.dtype(rc.store_dtype))
        jax.block_until_ready(data)
        capture_s = time.perf_counter() - start
        mp = subtree(params["var"], target.path)
        mq = subtree(quant, target.path) if _has(quant, target.path) else {}
        unit_progress = None if progress is None else functools.partial(progress, target.name)
        learned, record = reconstruct_module(var_cfg, target, mp, mq, data, policy, rc,
                                             jax.random.fold_in(key, index), unit_progress)
        if "skipped" not in record:
            quant = replace_subtree(quant, target.path, learned)
        record["seconds"] = time.perf_counter() - start
        record["capture_seconds"] = capture_s
        done, records = done + [target.name], records + [record]
        if workdir:
            recon_state.save(workdir, quant, key_data, done, records, run_fp)
        if callback is not None:
            callback(record, quant)
    return ReconResult(quant, records, done)
