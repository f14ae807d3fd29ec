"""Loading the official-code golden fixtures (format: shared/fixtures/README.md)."""
import glob
import json
import os

import numpy as np

from varq_jax import torch_mapping


def fixture_files(env_var: str, default_glob: str) -> list:
    pattern = os.environ.get(env_var) or os.path.join(os.path.dirname(__file__), "fixtures", default_glob)
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no fixture files match {pattern!r} (set by {env_var} or the default)")
    return files


def state_dict(z, prefix: str) -> dict:
    """The official state_dict stored under `prefix/` (float16-exact weights upcast to float32)."""
    out = {}
    for k in z.files:
        if k.startswith(prefix + "/") and k != "vae/recon_img":
            a = z[k]
            out[k[len(prefix) + 1:]] = a.astype(np.float32) if a.dtype == np.float16 else a
    return out


def load_var_fixture(path: str):
    """(meta, arrays, vae_cfg, var_cfg, params) of a var_*.npz fixture; settings from its meta_json."""
    z = np.load(path)
    meta = json.loads(str(z["meta_json"]))
    vae_cfg, var_cfg, params = torch_mapping.convert_state_dicts(
        state_dict(z, "vae"), state_dict(z, "var"), tuple(meta["patch_nums"]))
    assert var_cfg.depth == meta["depth"] and var_cfg.width == meta["C"] and var_cfg.heads == meta["H"]
    assert var_cfg.attn_l2_norm == meta["attn_l2_norm"] and var_cfg.shared_aln == meta["shared_aln"]
    assert vae_cfg.ch == meta["ch"] and list(vae_cfg.ch_mult) == list(meta["ch_mult"])
    return meta, z, vae_cfg, var_cfg, params


def rel_err(ours, ref) -> float:
    """max |ours − ref| / max |ref| over finite entries; the infinite pattern must agree exactly."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    fin = np.isfinite(ref)
    assert np.array_equal(np.isfinite(ours), fin), "finite/-inf pattern differs"
    assert np.array_equal(ours[~fin], ref[~fin])
    if not fin.any():
        return 0.0
    return float(np.abs(ours[fin] - ref[fin]).max() / max(np.abs(ref[fin]).max(), 1e-12))
