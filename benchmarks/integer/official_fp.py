"""The official VAR's FP sampling time (fp16 autocast, random weights), for ratios measured in the same lease.

  REF_DIR=.refs python benchmarks/integer/official_fp.py OUT.json d30:64,d16:64
Needs a checkout of github FoundationVision/VAR (never committed) at REF_DIR/FoundationVision+VAR.
BLAS=cublaslt picks PyTorch's cuBLASLt backend. AUTOCAST=bfloat16 autocasts to bf16 instead of the official fp16:
on the H200 image of sessions 9 and 16 every fp16 GEMM of PyTorch 2.11 failed with CUBLAS_STATUS_INTERNAL_ERROR
(also through cuBLASLt), while bf16 ran — the same FLOPs on the same tensor cores, so the closest reference there.
"""
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.environ.get("REF_DIR", ".refs"), "FoundationVision+VAR"))
from models import build_vae_var  # noqa: E402  (the official code)


def timeit(fn, n=5):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main(out, specs):
    torch.backends.cuda.matmul.allow_tf32 = True
    if os.environ.get("BLAS"):
        torch.backends.cuda.preferred_blas_library(os.environ["BLAS"])
    autocast = getattr(torch, os.environ.get("AUTOCAST", "float16"))
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "blas": os.environ.get("BLAS", "default"),
           "autocast": str(autocast), "rows": []}
    for spec in specs.split(","):
        depth, batch = (int(v) for v in spec.removeprefix("d").split(":"))
        torch.manual_seed(0)
        vae, var = build_vae_var(V=4096, Cvae=32, ch=160, share_quant_resi=4, device="cuda",
                                 patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), num_classes=1000, depth=depth,
                                 shared_aln=False)
        for mod in vae.modules():           # build_vae_var leaves the VAE convs uninitialised
            if isinstance(mod, torch.nn.Conv2d):
                torch.nn.init.normal_(mod.weight, std=0.02)
        vae.eval(); var.eval()
        labels = torch.arange(batch, device="cuda") % 1000

        def go():
            with torch.inference_mode(), torch.autocast("cuda", enabled=True, dtype=autocast, cache_enabled=True):
                var.autoregressive_infer_cfg(B=batch, label_B=labels, cfg=1.5, top_k=900, top_p=0.96, g_seed=0,
                                             more_smooth=False)
        t = timeit(go)
        res["rows"].append({"depth": depth, "batch": batch, "s": t, "img_per_s": batch / t})
        print(f"official VAR d{depth} B{batch} ({autocast}): {t * 1e3:.1f} ms ({batch / t:.1f} img/s)", flush=True)
        vae = var = None
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
