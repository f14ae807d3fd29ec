"""Where learned rounding moved each reconstructed Linear's codes away from round-to-nearest, for the CI digests.

AdaRound at the digests' tiny budget flips ~0.2 % of a unit's roundings, and a few of those sit so close to the
threshold that float reductions that differ between CPUs (XLA's codegen follows the host) flip them either way: the
recorded SHA-256 of such a unit's codes holds on one machine only. This records, for the CI variant's learned units,
the bytes where the learned codes differ from the nearest ones (positions and values) and the nearest codes' digest,
so `tests/test_preset_digests.py` can accept a few threshold flips and still reject any real change. Run on the code
before the rule table (commit c96d680), as record.py (OUT.json: the CI digests it adds to):
  PYTHONPATH=<checkout of c96d680> python benchmarks/preset_digests/record_learned.py OUT.json
"""
import sys
import tempfile

sys.meta_path[:] = [f for f in sys.meta_path if "ditable" not in str(f)]     # the checkout, not an editable install
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402

COMBO = "w4a6:full"
LEARNED = ("blocks_0/attn/mat_qkv", "blocks_0/attn/proj", "blocks_0/ffn/fc1", "blocks_0/ffn/fc2", "head")


def main(path: str):
    from varq_jax import default_model
    from varq_jax.quant import pipeline, state
    ck = default_model.load_model(None)
    config = record.tiny_config(*COMBO.split(":"))
    with tempfile.TemporaryDirectory() as wd:
        result = pipeline.run_ptq(ck, config, wd, log=lambda *_: None, reconstruct=record.ci_reconstruct)
    _, learned = state.export_quantized(ck.params["var"], result.quant, result.policy)
    quant = result.quant
    for k in LEARNED:
        quant = record.nearest_alpha(ck, quant, tuple(k.split("/")))
    _, nearest = state.export_quantized(ck.params["var"], quant, result.policy)
    out = {}
    for k in LEARNED:
        a, n = np.asarray(learned[k]), np.asarray(nearest[k])
        pos = np.flatnonzero(a != n)
        out[k] = {"sha256": record.sha(a), "nearest_sha256": record.sha(n), "positions": pos.tolist(),
                  "values": a[pos].tolist()}
        print(k, len(pos), "of", a.size, "bytes learned away from nearest", flush=True)
    recorded = json.load(open(path))
    recorded[COMBO]["learned_codes"] = out
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(recorded, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    main(sys.argv[1])
