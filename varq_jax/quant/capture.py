"""What BRECQ reconstructs, in which order, and the FP inputs/outputs it fits — captured from one forward pass.

Reconstruction units follow the official `recon_model`, which walks the model's children in registration order:
`shared_ada_lin` (shared-AdaLN models), then per block its `ada_lin`, `attn` and `ffn` (the last two as blocks,
the Linears as layers), then `head_nm`, `head` and finally `word_embed` (the official VAR registers it last).

Inputs and outputs come from the teacher-forced forward of the calibration tokens with classifier-free guidance
doubling (every sample once with its label, once with the null class, same tokens), instead of one KV-cached
sampling pass per sample: with a block-causal mask the per-scale activations are the same. A captured tensor is
[N, R, T, C]: sample, CFG row (R = 2: label, null; R = 1 for `word_embed`, which the official sampler applies
before doubling), token, channel. Layers that see one vector per sample (`ada_lin`, `head_nm`'s projection,
`shared_ada_lin`) have T = 1: the official caches only the first scale's call of those, as the input is the same
at every scale. With FP inputs (the default) the block units' data comes from a `BlockStream`, which keeps the
tokens entering the current block and moves one block forward at a time.
"""
import functools
from typing import Any, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from varq_jax.models.var import VAR, AdaLNBlock, VARConfig
from varq_jax.models.vqvae import VQVAE, VQVAEConfig
from varq_jax.quant.policy import QuantPolicy
from varq_jax.quant.units import ReconTarget, recon_targets

Array = jax.Array


@flax.struct.dataclass
class Captured:
    """FP reconstruction data of one unit: inputs [N, R, T, C_in] and outputs [N, R, T, C_out]."""
    inputs: Array
    outputs: Array

    @property
    def num_samples(self) -> int:
        return self.inputs.shape[0]


def _slot(path: tuple):
    """(slot, block index): blocks_i/<sub> → (('blocks', sub), i), so one compiled capture serves every block."""
    if len(path) == 2 and path[0].startswith("blocks_"):
        return ("blocks", path[1]), int(path[0][len("blocks_"):])
    return path, 0


def _record(model: VAR, variables: dict, slot: tuple, block_index, labels: Array, x_cvae: Array):
    """(input, output) of the submodule in `slot` (of block `block_index`, a traced int) in one teacher-forced
    apply. Every block's candidate is selected with `where`, so the block index need not be static."""
    seen = []

    def interceptor(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        scope = ctx.module.scope
        if ctx.method_name == "__call__" and scope is not None:
            s, i = _slot(tuple(scope.path))
            if s == slot:
                seen.append((i, args[0], out))
        return out

    with nn.intercept_methods(interceptor):
        model.apply(variables, labels, x_cvae)
    if not seen or len({i for i, _, _ in seen}) != len(seen):
        raise ValueError(f"slot {slot} was called {len(seen)} times in the forward; expected once per block")
    _, inp, out = seen[0]
    for i, x, y in seen[1:]:
        hit = block_index == i
        inp = jax.tree.map(lambda a, b: jnp.where(hit, b, a), inp, x)
        out = jax.tree.map(lambda a, b: jnp.where(hit, b, a), out, y)
    return inp, out


def _doubled_inputs(vae_cfg, var_cfg, params, labels, tokens):
    """(labels, then the null class [2b]; the VAR inputs of the tokens, twice [2b, L − pn₀², Cvae]): CFG doubling."""
    x_cvae = VQVAE(vae_cfg).apply({"params": params["vae"]}, tokens, method=VQVAE.idx_to_var_input)
    return (jnp.concatenate([labels, jnp.full_like(labels, var_cfg.num_classes)]),
            jnp.concatenate([x_cvae, x_cvae]))


def _chunks(n: int, batch_size: int) -> list:
    """(sample indices, rows to keep) per compiled call: the last chunk wraps around, its extra rows dropped."""
    bs = min(batch_size, n)
    return [(np.arange(s, s + bs) % n, min(bs, n - s)) for s in range(0, n, bs)]


def _to_rows(t: Array, cond_rows_only: bool, b: int) -> Array:
    """[2b, (T,) C] from the doubled batch → [b, R, T, C]."""
    if t.ndim == 2:
        t = t[:, None]
    t = t.reshape(2, b, *t.shape[1:]).swapaxes(0, 1)
    return t[:, :1] if cond_rows_only else t


@functools.partial(jax.jit, static_argnames=("vae_cfg", "var_cfg", "slot", "attn", "cond_rows_only", "dtype",
                                             "input_policy", "store_dtype"))
def _capture_batch(vae_cfg, var_cfg, slot, attn, cond_rows_only, dtype, input_policy, store_dtype, params, quant,
                   block_index, labels, tokens):
    b = labels.shape[0]
    labels2, x2 = _doubled_inputs(vae_cfg, var_cfg, params, labels, tokens)
    inp, out = _record(VAR(var_cfg, dtype), {"params": params["var"]}, slot, block_index, labels2, x2)
    if attn:
        out = out[0]
    if input_policy is not None:
        inp, _ = _record(VAR(var_cfg, dtype, input_policy), {"params": params["var"], "quant": quant},
                         slot, block_index, labels2, x2)
    return (_to_rows(inp, cond_rows_only, b).astype(store_dtype),
            _to_rows(out, cond_rows_only, b).astype(store_dtype))


def check_calibration(var_cfg: VARConfig, labels, tokens) -> tuple:
    """Labels as int32 [N] and tokens as a list of int32 [N, pn²] per scale ([N, L] is split); ValueError otherwise."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {labels.shape}, {labels.dtype}")
    if labels.min() < 0 or labels.max() >= var_cfg.num_classes:
        raise ValueError(f"labels must lie in [0, {var_cfg.num_classes}), got [{labels.min()}, {labels.max()}]")
    n = labels.shape[0]
    if isinstance(tokens, (np.ndarray, jax.Array)) and np.ndim(tokens) == 2:
        if tokens.shape[1] != var_cfg.L:
            raise ValueError(f"a 2-D token array must be [N, L={var_cfg.L}], got {tokens.shape}")
        tokens = [tokens[:, s:e] for s, e in var_cfg.begin_ends]
    tokens = list(tokens)
    if len(tokens) != var_cfg.num_scales:
        raise ValueError(f"need one token map per scale ({var_cfg.num_scales}), got {len(tokens)}")
    out = []
    for si, (t, pn) in enumerate(zip(tokens, var_cfg.patch_nums)):
        t = np.asarray(t)
        if t.shape != (n, pn * pn) or not np.issubdtype(t.dtype, np.integer):
            raise ValueError(f"tokens of scale {si} must be integer [N={n}, {pn * pn}], got {t.shape}, {t.dtype}")
        if t.min() < 0 or t.max() >= var_cfg.vocab_size:
            raise ValueError(f"tokens of scale {si} must lie in [0, {var_cfg.vocab_size}), got [{t.min()}, {t.max()}]")
        out.append(t.astype(np.int32))
    return labels.astype(np.int32), out


def capture(vae_cfg: VQVAEConfig, var_cfg: VARConfig, params: dict, labels, tokens: Sequence,
            target: ReconTarget, *, batch_size: int = 8, dtype: Any = jnp.float32,
            input_policy: Optional[QuantPolicy] = None, quant: Optional[dict] = None,
            store_dtype: Any = jnp.float32) -> Captured:
    """FP inputs and outputs of `target` for every calibration sample (CFG-doubled), `batch_size` samples per
    compiled forward. With `input_policy` (and its `quant` state) the inputs come from that quantized model
    instead (outputs stay FP); `partial_model_policy` gives the partly reconstructed model."""
    labels, tokens = check_calibration(var_cfg, labels, tokens)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if input_policy is not None and quant is None:
        raise ValueError("input_policy needs the quant state it reads (quant=...)")
    if target not in recon_targets(var_cfg):
        raise ValueError(f"{target.name!r} is not a reconstruction unit of this model")
    dtype, store_dtype = jnp.dtype(dtype), jnp.dtype(store_dtype)     # one compile whatever the spelling
    slot, block_index = _slot(target.path)
    ins, outs = [], []
    for idx, keep in _chunks(labels.shape[0], batch_size):
        inp, out = _capture_batch(vae_cfg, var_cfg, slot, target.spec.kind == "attn", target.cond_rows_only,
                                  dtype, input_policy, store_dtype, params,
                                  quant if input_policy is not None else None, jnp.int32(block_index),
                                  jnp.asarray(labels[idx]), [jnp.asarray(t[idx]) for t in tokens])
        ins.append(inp[:keep])
        outs.append(out[:keep])
    return Captured(jnp.concatenate(ins), jnp.concatenate(outs))


# --- FP inputs block by block ----------------------------------------------------------------------------------------
def _embed(model: VAR, labels: Array, x_cvae: Array):
    """(tokens entering block 0, what each block's AdaLN receives)."""
    x, cond = model.embed(labels, x_cvae)
    return x, model.block_condition(cond)


@functools.partial(jax.jit, static_argnames=("vae_cfg", "var_cfg", "dtype"))
def _stream_start(vae_cfg, var_cfg, dtype, params, labels, tokens):
    b = labels.shape[0]
    labels2, x2 = _doubled_inputs(vae_cfg, var_cfg, params, labels, tokens)
    x, bc = VAR(var_cfg, dtype).apply({"params": params["var"]}, labels2, x2, method=_embed)
    return _to_rows(x, False, b), bc.reshape(2, b, *bc.shape[1:]).swapaxes(0, 1)      # the stream stays float32


def _from_rows(t: Array) -> Array:
    """[b, 2, ...] → the doubled batch [2b, ...] (label rows, then null rows): the inverse of `_to_rows`."""
    return t.swapaxes(0, 1).reshape(-1, *t.shape[2:])


@functools.partial(jax.jit, static_argnames=("var_cfg", "dtype", "store_dtype"))
def _stream_block(var_cfg, dtype, store_dtype, block_params, x_rows, bc_rows):
    """One block on the stream: (tokens entering the next block, {unit: (input, output)}) in [b, 2, T, C] rows."""
    b = x_rows.shape[0]
    seen = {}

    def interceptor(next_fun, args, kwargs, ctx):
        out = next_fun(*args, **kwargs)
        scope = ctx.module.scope
        if ctx.method_name == "__call__" and scope is not None and len(scope.path) == 1:
            seen[scope.path[0]] = (args[0], out[0] if scope.path[0] == "attn" else out)
        return out

    with nn.intercept_methods(interceptor):
        x, _ = AdaLNBlock(var_cfg, dtype).apply({"params": block_params}, _from_rows(x_rows),
                                                _from_rows(bc_rows))
    units = {name: tuple(_to_rows(t, False, b).astype(store_dtype) for t in io) for name, io in seen.items()}
    return _to_rows(x, False, b), units


class BlockStream:
    """The FP inputs and outputs of every block's units, one block at a time.

    The tokens entering block i are kept for all calibration rows, so the data of block i's ada_lin, attn and ffn
    costs one block forward (`capture` runs the whole model per unit). Equal to `capture` for those units; the
    stream only moves forward (a resumed run advances it to its first unfinished block)."""

    def __init__(self, vae_cfg: VQVAEConfig, var_cfg: VARConfig, params: dict, labels, tokens, *,
                 batch_size: int = 8, dtype: Any = jnp.float32, store_dtype: Any = jnp.float32):
        labels, tokens = check_calibration(var_cfg, labels, tokens)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.var_cfg, self.params = var_cfg, params
        self.dtype, self.store_dtype = jnp.dtype(dtype), jnp.dtype(store_dtype)
        self.chunks = _chunks(labels.shape[0], batch_size)
        outs = [_stream_start(vae_cfg, var_cfg, self.dtype, params, jnp.asarray(labels[c]),
                              [jnp.asarray(t[c]) for t in tokens]) for c, _ in self.chunks]
        self.x = self._join([o[0] for o in outs])
        self.bc = self._join([o[1] for o in outs])
        self.next_block, self.units = 0, {}

    def _join(self, parts):
        return jnp.concatenate([p[:keep] for p, (_, keep) in zip(parts, self.chunks)])

    def _advance(self):
        i = self.next_block
        block_params = self.params["var"][f"blocks_{i}"]
        outs = [_stream_block(self.var_cfg, self.dtype, self.store_dtype, block_params, self.x[c], self.bc[c])
                for c, _ in self.chunks]
        self.x = self._join([o[0] for o in outs])
        self.units = {f"blocks_{i}/{name}": Captured(self._join([o[1][name][0] for o in outs]),
                                                     self._join([o[1][name][1] for o in outs]))
                      for name in outs[0][1]}
        self.next_block += 1

    def get(self, target: "ReconTarget") -> Captured:
        """The FP data of a block unit (blocks_i/ada_lin, attn or ffn)."""
        if not target.in_block:
            raise ValueError(f"{target.name!r} is not a block unit; use capture()")
        slot, i = _slot(target.path)
        if i < self.next_block - 1:
            raise ValueError(f"the stream is past block {i} (at {self.next_block - 1}); it only moves forward")
        while self.next_block <= i:
            self.units = {}                      # free the previous block's data before computing the next
            self._advance()
        if target.name not in self.units:
            raise ValueError(f"block {i} has no unit {slot[1]!r}")
        return self.units[target.name]


# --- calibrated activation-quantizer state ---------------------------------------------------------------------------


