"""Released PyTorch VAR checkpoints → a varq-jax Orbax checkpoint directory.

  python convert_torch_weights.py --vae vae_ch160v4096z32.pth --var var_d16.pth --out DIR [--dtype bfloat16]

Depth, width, heads, attn_l2_norm, shared_aln and patch_nums are read off the keys (`--patch-nums 1,2,3,...`
when L is not one of the released presets). Strict: any missing/unexpected key or shape mismatch stops with the
full list, and nothing is written unless everything converted (the directory appears atomically). Weights holding
NaN or inf are refused, naming the tensors (`--allow-nonfinite` writes them anyway).
"""
import argparse
import os
import sys

import numpy as np

from varq_jax import checkpoint, torch_mapping


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", required=True, help="official VQVAE state_dict (.pth)")
    p.add_argument("--var", required=True, help="official VAR state_dict (.pth)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--patch-nums", default=None, help="comma-separated, e.g. 1,2,3,4,5,6,8,10,13,16")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-nonfinite", action="store_true", help="write weights holding NaN/inf (refused otherwise)")
    args = p.parse_args(argv)
    try:
        if os.path.exists(args.out) and not args.overwrite:
            raise FileExistsError(f"output {args.out} already exists (pass --overwrite to replace it)")
        for f in (args.vae, args.var):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"no such checkpoint file: {f}")
        pns = tuple(int(x) for x in args.patch_nums.split(",")) if args.patch_nums else None
        import jax.numpy as jnp
        dtype = np.float32 if args.dtype == "float32" else jnp.bfloat16
        vae_cfg, var_cfg, params = torch_mapping.convert_state_dicts(
            torch_mapping.load_torch_state_dict(args.vae), torch_mapping.load_torch_state_dict(args.var), pns, dtype)
        prov = checkpoint.provenance(source="convert_torch_weights.py", vae_file=os.path.basename(args.vae),
                                     var_file=os.path.basename(args.var))
        checkpoint.save(args.out, vae_cfg, var_cfg, params, meta={"provenance": prov}, overwrite=args.overwrite,
                        allow_nonfinite=args.allow_nonfinite)
    except (torch_mapping.ConversionError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: VAR depth {var_cfg.depth}, width {var_cfg.width}, heads {var_cfg.heads}, "
          f"attn_l2_norm={var_cfg.attn_l2_norm}, shared_aln={var_cfg.shared_aln}, patch_nums={var_cfg.patch_nums}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
