"""What BRECQ reconstructs, in which order: the units of the official recon_model and unit-relative views of
the policy (a unit sees its own sites with the rules they resolve to in the whole model).

Units follow the official `recon_model`, which walks the model children in registration order:
`shared_ada_lin` (shared-AdaLN models), then per block its `ada_lin`, `attn` and `ffn` (the last two as blocks,
the Linears as layers), then `head_nm`, `head` and finally `word_embed` (the official VAR registers it last).
"""
import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from varq_jax.models.var import FFN, Dense, SelfAttention, VARConfig
from varq_jax.quant.policy import QuantPolicy

Array = jax.Array


KINDS = ("attn", "ffn", "dense")


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """How to rebuild one reconstruction unit standalone. Path-free, so identical blocks share one compiled loop."""
    kind: str                        # attn | ffn | dense
    features: int = 0                # dense: output features
    site: str = ""                   # dense: the Linear's site name (as in var.py)
    out_float32: bool = False        # dense: output kept in float32 (word_embed, head)
    multi_scale: bool = True         # False: one vector per row (T = 1)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def build(self, cfg: VARConfig, dtype, policy) -> nn.Module:
        if self.kind == "attn":
            return SelfAttention(cfg, dtype, policy)
        if self.kind == "ffn":
            return FFN(cfg, dtype, policy)
        return Dense(self.features, self.site, dtype=dtype, out_dtype=jnp.float32 if self.out_float32 else None,
                     policy=policy)

    def apply(self, module: nn.Module, params: dict, quant: Optional[dict], x: Array) -> Array:
        """The unit's output on x [rows, T, C]; attention evaluates per scale block under a quantization policy."""
        variables = {"params": params, **({"quant": quant} if quant else {})}
        out = module.apply(variables, x)
        return out[0] if self.kind == "attn" else out


@dataclasses.dataclass(frozen=True)
class ReconTarget:
    path: tuple
    spec: ModuleSpec

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def is_block(self) -> bool:
        return self.spec.kind != "dense"

    @property
    def in_block(self) -> bool:
        """A unit of a transformer block (blocks_i/…): its FP data can come from a `BlockStream`."""
        return len(self.path) == 2 and self.path[0].startswith("blocks_")

    @property
    def cond_rows_only(self) -> bool:
        return self.path == ("word_embed",)


def recon_targets(cfg: VARConfig) -> tuple:
    """All reconstruction units of a VAR in the official order."""
    c = cfg.width
    out = []
    if cfg.shared_aln:
        out.append(ReconTarget(("shared_ada_lin",), ModuleSpec("dense", 6 * c, "shared_ada_lin", multi_scale=False)))
    for i in range(cfg.depth):
        blk = f"blocks_{i}"
        if not cfg.shared_aln:
            out.append(ReconTarget((blk, "ada_lin"), ModuleSpec("dense", 6 * c, "ada_lin", multi_scale=False)))
        out.append(ReconTarget((blk, "attn"), ModuleSpec("attn")))
        out.append(ReconTarget((blk, "ffn"), ModuleSpec("ffn")))
    out.append(ReconTarget(("head_nm",), ModuleSpec("dense", 2 * c, "head_nm", multi_scale=False)))
    out.append(ReconTarget(("head",), ModuleSpec("dense", cfg.vocab_size, "head", out_float32=True)))
    out.append(ReconTarget(("word_embed",), ModuleSpec("dense", c, "word_embed", out_float32=True)))
    return tuple(out)


def target_by_name(cfg: VARConfig, name: str) -> ReconTarget:
    targets = {t.name: t for t in recon_targets(cfg)}
    if name not in targets:
        raise ValueError(f"no reconstruction unit {name!r} in this model; valid: {', '.join(targets)}")
    return targets[name]


def segments(cfg: VARConfig, target: ReconTarget) -> tuple:
    """(start, end) of each scale along the captured token axis: the loss averages tokens within a scale and
    sums over scales. word_embed sees scales 1…K−1 only; one-vector layers have a single segment."""
    if not target.spec.multi_scale:
        return ((0, 1),)
    if target.cond_rows_only:
        first = cfg.patch_nums[0] ** 2
        return tuple((s - first, e - first) for s, e in cfg.begin_ends[1:])
    return cfg.begin_ends


def subtree(tree: dict, path: tuple) -> dict:
    """The node of a nested dict at `path` (the module-relative params or quant state)."""
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"no entry {'/'.join(path)!r} in the tree (missing {key!r})")
        node = node[key]
    return node


def replace_subtree(tree: dict, path: tuple, node: dict) -> dict:
    """A copy of `tree` whose node at `path` is `node` (other branches shared, not copied)."""
    if not path:
        return node
    out = dict(tree)
    out[path[0]] = replace_subtree(tree.get(path[0], {}), path[1:], node)
    return out


def linear_paths(module_params: dict) -> list:
    """Module-relative paths of the Linears (nodes holding a 2-D 'kernel'); () for a bare Dense."""
    flat = traverse_util.flatten_dict(module_params)
    return sorted(p[:-1] for p, a in flat.items() if p[-1] == "kernel" and np.ndim(a) == 2)


def unit_sites(target: ReconTarget, module_params: dict) -> list:
    """Module-relative paths of the unit's sites: its Linears and, for an attention unit, the attention itself."""
    rel = ["/".join(p) for p in linear_paths(module_params)]
    return ([""] if target.spec.kind == "attn" else []) + rel


def standalone_policy(policy: QuantPolicy, target: ReconTarget, module_params: dict, **changes) -> QuantPolicy:
    """The policy for the unit applied on its own: the rules of its sites' full paths, bound to the unit
    (`QuantPolicy.bind`), so a rule for `blocks_3/ffn/fc2` applies here as in the whole model."""
    bound = policy.bind(target.name, unit_sites(target, module_params))
    return dataclasses.replace(bound, weights_prequantized=False, **changes)


def trainable_linears(policy: QuantPolicy, target: ReconTarget, module_params: dict) -> list:
    """Module-relative paths of the Linears whose rounding is learned: weights quantized, rounding 'adaround'."""
    out = []
    for rel in linear_paths(module_params):
        rule = policy.rule_for("/".join(target.path + rel))
        if rule.weights and rule.rounding == "adaround":
            out.append(rel)
    return out


def partial_model_policy(policy: QuantPolicy) -> QuantPolicy:
    """The partly reconstructed model that gives the inputs in `quantized_inputs` mode: learned (hard) rounding
    where a Linear already has α, nearest elsewhere — the same policy (subclass and rules kept), phase 'hard'."""
    return dataclasses.replace(policy, phase="hard", weights_prequantized=False)
