"""Official PyTorch state_dict ↔ our Flax params: key names, layouts, and model settings read off the keys.

Pure NumPy (no torch import): `convert_torch_weights.py` loads the `.pth` files with torch and hands plain
arrays here. Conversion is strict: every expected key must be present with the right shape and nothing else
may be left over (except the recomputable buffers), otherwise a `ConversionError` lists every problem.
"""
import re
from typing import Mapping, Optional

import numpy as np
from flax import traverse_util

from varq_jax.models.var import VARConfig
from varq_jax.models.vqvae import VQVAEConfig
from varq_jax.models.zoo import PATCH_NUMS

# Buffers the official modules save that we recompute (or never need).
IGNORED_VAR_KEYS = re.compile(r"^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$")
IGNORED_VAE_KEYS = re.compile(r"^quantize\.ema_vocab_hit_SV$")


class ConversionError(ValueError):
    """A checkpoint that does not match the model; the message lists every problem."""


# --- key names ----------------------------------------------------------------------------------------------
def _vae_module(name: str, share_quant_resi: int) -> str:
    rules = [
        (r"^(down|up)_(\d+)_(block|attn)_(\d+)$", r"\1.\2.\3.\4"),
        (r"^down_(\d+)_downsample$", r"down.\1.downsample.conv"),
        (r"^up_(\d+)_upsample$", r"up.\1.upsample.conv"),
        (r"^mid_(block_1|attn_1|block_2)$", r"mid.\1"),
    ]
    for pat, rep in rules:
        if re.match(pat, name):
            return re.sub(pat, rep, name)
    m = re.match(r"^phi_(\d+)$", name)
    if m:
        k = m.group(1)
        return {0: f"quantize.quant_resi.{k}", 1: "quantize.quant_resi.qresi"}.get(
            share_quant_resi, f"quantize.quant_resi.qresi_ls.{k}")
    return name


def vae_torch_key(path: tuple, cfg: VQVAEConfig) -> str:
    if path == ("embedding",):
        return "quantize.embedding.weight"
    *mods, leaf = path
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join([_vae_module(m, cfg.share_quant_resi) for m in mods] + [leaf])


_VAR_RENAMES = {
    ("class_emb",): "class_emb.weight",
    ("lvl_embed",): "lvl_embed.weight",
    ("pos_start",): "pos_start",
    ("pos_1LC",): "pos_1LC",
}


def var_torch_key(path: tuple) -> str:
    if path in _VAR_RENAMES:
        return _VAR_RENAMES[path]
    *mods, leaf = path
    mods = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", m) for m in mods]
    mods = [{"ada_lin": "ada_lin.1", "shared_ada_lin": "shared_ada_lin.1", "head_nm": "head_nm.ada_lin.1"}.get(m, m)
            for m in mods]
    leaf = {"kernel": "weight", "scale_mul": "scale_mul_1H11"}.get(leaf, leaf)
    return ".".join(mods + [leaf])


# --- layouts -----------------------------------------------------------------------------------------------
def to_flax_layout(path: tuple, t: np.ndarray, flax_shape: tuple) -> np.ndarray:
    """Torch tensor → our layout: Linear [out,in]→[in,out], Conv2d [o,i,kh,kw]→[kh,kw,i,o], drop singleton axes."""
    if path[-1] == "kernel":
        t = t.transpose(2, 3, 1, 0) if t.ndim == 4 else t.T
    elif t.ndim != len(flax_shape) and t.size == int(np.prod(flax_shape)):
        t = t.reshape(flax_shape)       # pos_start (1,n,C), pos_1LC (1,L,C), ada_gss (1,1,6,C), scale_mul (1,H,1,1)
    return t


def to_torch_layout(path: tuple, a: np.ndarray, torch_shape: Optional[tuple] = None) -> np.ndarray:
    if path[-1] == "kernel":
        a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
    elif torch_shape is not None:
        a = a.reshape(torch_shape)
    return a


def torch_shape_of(path: tuple, flax_shape: tuple) -> tuple:
    """The official tensor shape of a Flax leaf (used to check shapes before any transposition)."""
    if path[-1] == "kernel":
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1]) if len(flax_shape) == 4 else flax_shape[::-1]
    leaf = path[-1]
    if leaf in ("pos_start", "pos_1LC"):
        return (1,) + tuple(flax_shape)
    if leaf == "ada_gss":
        return (1, 1) + tuple(flax_shape)
    if leaf == "scale_mul":
        return (1, flax_shape[0], 1, 1)
    return tuple(flax_shape)


# --- conversion --------------------------------------------------------------------------------------------
def convert_state_dict(state_dict: Mapping[str, np.ndarray], abstract_params, key_fn, ignored: re.Pattern,
                       what: str, dtype=np.float32):
    """Maps a flat torch state_dict onto the tree of `abstract_params` (shapes); strict, lists all problems."""
    flat = traverse_util.flatten_dict(abstract_params)
    out, problems, used = {}, [], set()
    for path, leaf in flat.items():
        key = key_fn(path)
        if key not in state_dict:
            problems.append(f"missing key {key!r} (for {'/'.join(path)}, shape {torch_shape_of(path, leaf.shape)})")
            continue
        used.add(key)
        t = np.asarray(state_dict[key])
        want = torch_shape_of(path, tuple(leaf.shape))
        if tuple(t.shape) != want:
            problems.append(f"shape mismatch for {key!r}: checkpoint {tuple(t.shape)}, model expects {want}")
            continue
        out[path] = to_flax_layout(path, t.astype(np.float32), tuple(leaf.shape)).astype(dtype)
    extra = sorted(k for k in state_dict if k not in used and not ignored.match(k))
    problems += [f"unexpected key {k!r} {tuple(np.shape(state_dict[k]))}" for k in extra]
    if problems:
        raise ConversionError(f"{what} checkpoint does not match the model ({len(problems)} problems):\n  "
                              + "\n  ".join(problems))
    return traverse_util.unflatten_dict(out)


def params_to_state_dict(params, key_fn) -> dict:
    """Our params → an official-layout flat state_dict (for export and round-trip tests)."""
    out = {}
    for path, a in traverse_util.flatten_dict(params).items():
        a = np.asarray(a, np.float32)
        out[key_fn(path)] = to_torch_layout(path, a, torch_shape_of(path, a.shape))
    return out


# --- model settings from the keys --------------------------------------------------------------------------
def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def infer_patch_nums(L: int, num_scales: int) -> tuple:
    """patch_nums from the token count: a released preset if L matches, else the unique increasing sequence
    starting at 1 with `num_scales` entries whose squares sum to L."""
    for pns in PATCH_NUMS.values():
        if sum(p * p for p in pns) == L and len(pns) == num_scales:
            return pns
    found = []

    def search(prefix, remaining, left):
        if len(found) > 1:
            return
        if left == 0:
            if remaining == 0:
                found.append(tuple(prefix))
            return
        p = prefix[-1] + 1
        while p * p * left <= remaining:
            search(prefix + [p], remaining - p * p, left - 1)
            p += 1

    if num_scales >= 1 and L >= 1:
        search([1], L - 1, num_scales - 1)
    if len(found) != 1:
        raise ConversionError(f"cannot infer patch_nums from L={L} with {num_scales} scales "
                              f"({'ambiguous' if found else 'no solution'}); pass --patch-nums")
    return found[0]


def infer_var_config(sd: Mapping[str, np.ndarray], patch_nums: Optional[tuple] = None) -> VARConfig:
    keys = list(sd)
    for k in ("pos_start", "pos_1LC", "class_emb.weight", "lvl_embed.weight", "head.weight", "word_embed.weight"):
        if k not in sd:
            raise ConversionError(f"VAR checkpoint lacks {k!r}: not an official VAR state_dict")
    depth = _count(keys, r"^blocks\.(\d+)\.")
    width = sd["pos_start"].shape[-1]
    l2 = "blocks.0.attn.scale_mul_1H11" in sd
    heads = sd["blocks.0.attn.scale_mul_1H11"].shape[1] if l2 else width // 64
    L, sn = sd["pos_1LC"].shape[1], sd["lvl_embed.weight"].shape[0]
    if patch_nums is None:
        patch_nums = infer_patch_nums(L, sn)
    elif sum(p * p for p in patch_nums) != L or len(patch_nums) != sn:
        raise ConversionError(f"--patch-nums {patch_nums} gives L={sum(p * p for p in patch_nums)} with "
                              f"{len(patch_nums)} scales; the checkpoint has L={L} with {sn} scales")
    hidden = sd["blocks.0.ffn.fc1.weight"].shape[0] if "blocks.0.ffn.fc1.weight" in sd else 4 * width
    return VARConfig(depth=depth, width=width, heads=heads, mlp_ratio=hidden / width,
                     num_classes=sd["class_emb.weight"].shape[0] - 1, vocab_size=sd["head.weight"].shape[0],
                     cvae=sd["word_embed.weight"].shape[1], patch_nums=tuple(patch_nums), attn_l2_norm=l2,
                     shared_aln="shared_ada_lin.1.weight" in sd)


def infer_vae_config(sd: Mapping[str, np.ndarray], patch_nums: tuple, quant_resi: float = 0.5) -> VQVAEConfig:
    keys = list(sd)
    for k in ("encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight"):
        if k not in sd:
            raise ConversionError(f"VQVAE checkpoint lacks {k!r}: not an official VQVAE state_dict")
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _count(keys, r"^encoder\.down\.(\d+)\.")
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    if "quantize.quant_resi.qresi.weight" in sd:
        share = 1
    elif any(k.startswith("quantize.quant_resi.qresi_ls.") for k in keys):
        share = _count(keys, r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.")
    elif any(re.match(r"^quantize\.quant_resi\.\d+\.", k) for k in keys):
        share = 0
    else:
        share, quant_resi = 4, 0.0
    return VQVAEConfig(vocab_size=sd["quantize.embedding.weight"].shape[0], z_channels=sd["encoder.conv_out.weight"].shape[0],
                       ch=ch, ch_mult=ch_mult, num_res_blocks=_count(keys, r"^encoder\.down\.0\.block\.(\d+)\."),
                       in_channels=sd["encoder.conv_in.weight"].shape[1], patch_nums=tuple(patch_nums),
                       share_quant_resi=share, quant_resi=quant_resi,
                       using_sa=any(k.startswith(f"encoder.down.{levels - 1}.attn.") for k in keys),
                       using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd)


# --- whole checkpoints -------------------------------------------------------------------------------------
def load_torch_state_dict(path: str) -> dict:
    """A flat state_dict of NumPy arrays from an official `.pth` file (needs the `convert` extra: torch)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading .pth files needs torch: pip install 'varq-jax[convert]'") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError for truncated or foreign files
        raise ConversionError(f"cannot read {path!r} as a PyTorch checkpoint "
                              f"(truncated or not a torch.save file): {type(e).__name__}: {e}") from e
    if isinstance(obj, dict) and "trainer" in obj:
        raise ConversionError(f"{path!r} is a VAR training checkpoint (ar-ckpt-*.pth); pass the released "
                              f"state_dict file instead (or extract obj['trainer']['var_wo_ddp'])")
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ConversionError(f"{path!r} does not hold a flat state_dict of tensors")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}


def convert_state_dicts(vae_sd: Mapping[str, np.ndarray], var_sd: Mapping[str, np.ndarray],
                        patch_nums: Optional[tuple] = None, dtype=np.float32, quant_resi: float = 0.5):
    """Official VQVAE + VAR state_dicts → (VQVAEConfig, VARConfig, params {'vae', 'var'}); strict."""
    from varq_jax.models.build import abstract_params
    var_cfg = infer_var_config(var_sd, patch_nums)
    vae_cfg = infer_vae_config(vae_sd, var_cfg.patch_nums, quant_resi)
    if vae_cfg.vocab_size != var_cfg.vocab_size or vae_cfg.z_channels != var_cfg.cvae:
        raise ConversionError(f"VQVAE (vocab {vae_cfg.vocab_size}, Cvae {vae_cfg.z_channels}) and VAR (vocab "
                              f"{var_cfg.vocab_size}, Cvae {var_cfg.cvae}) checkpoints do not belong together")
    shapes = abstract_params(vae_cfg, var_cfg)
    errors, params = [], {}
    for name, sd, key_fn, ignored, what in (
            ("vae", vae_sd, lambda p: vae_torch_key(p, vae_cfg), IGNORED_VAE_KEYS, "VQVAE"),
            ("var", var_sd, var_torch_key, IGNORED_VAR_KEYS, "VAR")):
        try:
            params[name] = convert_state_dict(sd, shapes[name], key_fn, ignored, what, dtype)
        except ConversionError as e:
            errors.append(str(e))
    if errors:
        raise ConversionError("\n".join(errors))
    return vae_cfg, var_cfg, params
