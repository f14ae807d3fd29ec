"""pytorch-fid's FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`) → an Orbax checkpoint of our
Flax `InceptionV3` variables, and the loader for it.

    python -m varq_jax.eval.convert_inception --pth pt_inception-2015-12-05-6726825d.pth --out DIR

Nothing is downloaded: the user places the .pth file. Conversion is strict (every key of the network present
with the right shape, nothing unexpected besides BatchNorm's `num_batches_tracked` counters), and all problems
are listed in one `ConversionError` before anything is written. The checkpoint is written to a temporary
sibling directory and renamed into place, so a failed run leaves no output directory behind.
"""
import argparse
import os
import re
from typing import Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from varq_jax.eval.inception import InceptionV3, abstract_variables
from varq_jax.files import atomic_directory
from varq_jax.torch_mapping import ConversionError

FORMAT = "varq_jax.eval.inception/fid-inception-v3@1"
IGNORED_KEYS = re.compile(r"(^|\.)num_batches_tracked$")

# (collection, Flax leaf name) → torch suffix
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def torch_key(collection: str, path: tuple) -> str:
    """('params', ('Mixed_5b', 'branch1x1', 'conv', 'kernel')) → 'Mixed_5b.branch1x1.conv.weight'."""
    *modules, leaf = path
    return ".".join(list(modules) + [_LEAF_TO_TORCH[(collection, leaf)]])


def torch_shape(path: tuple, flax_shape: tuple) -> tuple:
    """Conv kernels are [kh, kw, in, out] here and [out, in, kh, kw] in torch; `fc` is [in, out] vs [out, in]."""
    if path[-1] == "kernel":
        if len(flax_shape) == 4:
            return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
        return tuple(flax_shape[::-1])
    return tuple(flax_shape)


def _to_flax_layout(path: tuple, t: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return t.transpose(2, 3, 1, 0) if t.ndim == 4 else t.T
    return t


def expected_state_dict_shapes(model: InceptionV3 = InceptionV3()) -> dict:
    """pytorch-fid key → torch shape, read off the Flax network's own variables."""
    out = {}
    for collection, tree in abstract_variables(model).items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            out[torch_key(collection, path)] = torch_shape(path, tuple(leaf.shape))
    return out


def _as_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):                                   # torch.Tensor, without importing torch
        t = t.detach().cpu().numpy()
    return np.asarray(t)


def convert_state_dict(state_dict: Mapping[str, object], model: InceptionV3 = InceptionV3()) -> dict:
    """pytorch-fid state_dict (torch tensors or NumPy arrays) → {'params': …, 'batch_stats': …} of float32."""
    problems, used, converted = [], set(), {}
    for collection, tree in abstract_variables(model).items():
        flat = {}
        for path, leaf in traverse_util.flatten_dict(tree).items():
            key, want = torch_key(collection, path), torch_shape(path, tuple(leaf.shape))
            if key not in state_dict:
                problems.append(f"missing key {key!r} (shape {want})")
                continue
            used.add(key)
            t = _as_numpy(state_dict[key])
            if tuple(t.shape) != want:
                problems.append(f"shape mismatch for {key!r}: checkpoint {tuple(t.shape)}, network expects {want}")
                continue
            flat[path] = np.ascontiguousarray(_to_flax_layout(path, t.astype(np.float32)))
        converted[collection] = traverse_util.unflatten_dict(flat)
    extra = sorted(k for k in state_dict if k not in used and not IGNORED_KEYS.search(k))
    problems += [f"unexpected key {k!r} (shape {tuple(_as_numpy(state_dict[k]).shape)})" for k in extra]
    if problems:
        raise ConversionError(f"state_dict does not match the FID InceptionV3 ({len(problems)} problems):\n  "
                              + "\n  ".join(problems))
    return converted


def check_variables(variables: Mapping, model: InceptionV3 = InceptionV3()) -> None:
    """Raises ConversionError unless `variables` has exactly the network's collections, paths and shapes."""
    want = {(c,) + p: tuple(a.shape) for c, t in abstract_variables(model).items()
            for p, a in traverse_util.flatten_dict(t).items()}
    got = {(c,) + p: tuple(np.shape(a)) for c, t in variables.items()
           for p, a in traverse_util.flatten_dict(dict(t)).items()}
    problems = [f"missing {'/'.join(p)} {s}" for p, s in want.items() if p not in got]
    problems += [f"unexpected {'/'.join(p)} {s}" for p, s in got.items() if p not in want]
    problems += [f"shape mismatch at {'/'.join(p)}: {got[p]}, network expects {s}"
                 for p, s in want.items() if p in got and got[p] != s]
    if problems:
        raise ConversionError(f"variables do not match the FID InceptionV3 ({len(problems)} problems):\n  "
                              + "\n  ".join(problems))


def save_variables(variables: Mapping, out_dir: str, metadata: Optional[dict] = None) -> str:
    """Writes `variables` as an Orbax checkpoint at `out_dir` atomically; refuses to overwrite."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise ValueError(f"output directory {out_dir} already exists; remove it or choose another --out")
    check_variables(variables)
    with atomic_directory(out_dir) as staging:
        meta = {"format": FORMAT, **(metadata or {})}
        host = jax.tree.map(np.asarray, dict(variables))
        ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
            staging, args=ocp.args.Composite(variables=ocp.args.StandardSave(host), metadata=ocp.args.JsonSave(meta)))
    return out_dir


def load_variables(ckpt_dir: str) -> dict:
    """Reads a checkpoint written by `save_variables`; checks its format tag and every shape."""
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"no Inception checkpoint directory at {ckpt_dir}; create it with "
                         f"`python -m varq_jax.eval.convert_inception --pth FILE --out DIR`")
    try:
        restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
            os.path.abspath(ckpt_dir),
            args=ocp.args.Composite(variables=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises several types for unreadable or foreign directories
        raise ValueError(f"cannot read an Inception checkpoint from {ckpt_dir}: {e}") from e
    if (restored.metadata or {}).get("format") != FORMAT:
        raise ValueError(f"{ckpt_dir} is not an FID Inception checkpoint (metadata {restored.metadata})")
    variables = {c: dict(t) for c, t in restored.variables.items()}
    check_variables(variables)
    return variables


def load_torch_state_dict(pth: str) -> dict:
    """The .pth as {key: float32 ndarray}; needs torch (the `convert` extra)."""
    if not os.path.isfile(pth):
        raise ValueError(f"no weight file at {pth}; place pytorch-fid's pt_inception-2015-12-05-6726825d.pth there")
    import torch  # only the conversion needs torch
    try:
        sd = torch.load(pth, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load {pth} with torch.load: {e}") from e
    if not isinstance(sd, Mapping):
        raise ValueError(f"{pth} holds a {type(sd).__name__}, not a state_dict")
    return {k: _as_numpy(v) for k, v in sd.items()}


def convert_file(pth: str, out_dir: str) -> str:
    if os.path.exists(out_dir):   # before the slow torch.load
        raise ValueError(f"output directory {os.path.abspath(out_dir)} already exists; remove it or choose another --out")
    variables = convert_state_dict(load_torch_state_dict(pth))
    return save_variables(variables, out_dir, metadata={"source": os.path.basename(pth)})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pth", required=True, help="pytorch-fid weights, pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("--out", required=True, help="checkpoint directory to create (must not exist)")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {convert_file(args.pth, args.out)}")
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
