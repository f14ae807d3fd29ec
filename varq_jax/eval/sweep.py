"""A sweep: several checkpoints evaluated alike (same labels, keys and references), one table.
"""
import dataclasses
import json
import os
from typing import Callable, List, Optional, Sequence

from absl import logging

from varq_jax import default_model, parallel
from varq_jax.eval import generate as gen_lib
from varq_jax.eval import metrics
from varq_jax.eval.evaluate import (
    METRIC_DESCRIPTIONS,
    EvalConfig,
    evaluate,
    load_resources,
)
from varq_jax.files import atomic_write


def _sweep_row(results: dict) -> dict:
    row = {"checkpoint": results["checkpoint"], "quantization": results["quantization"],
           "random_weights": results["random_weights"], "num_images": results["samples"]["num_images"],
           **results["metrics"]}
    for task, scores in results.get("zero_shot", {}).items():
        row.update({f"{task}/{k}": v for k, v in scores.items() if k != "num_images"})
    return row


def sweep_markdown(rows: Sequence[dict]) -> str:
    cols = ["checkpoint", "quantization", "random_weights", "num_images"]
    cols += sorted({k for r in rows for k in r} - set(cols), key=lambda k: (k not in METRIC_DESCRIPTIONS, k))

    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, dict):
            return f"W{v['w_bits']}A{v['a_bits']}{' SaS' if v.get('shift_and_sum') else ''}"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def sweep(checkpoints: Sequence[Optional[str]], out_dir: str, config: EvalConfig, *, fid_to_first: bool = False,
          mesh=None, log: Callable[[str], None] = logging.info) -> List[dict]:
    """Evaluates each checkpoint (None: the embedded default) into out_dir/NN_name/ and writes one table,
    out_dir/sweep.md and sweep.json. `fid_to_first`: the first checkpoint's samples are every later one's
    --ref_samples (e.g. FP first: FID to FP). Reference features are computed once."""
    if not checkpoints:
        raise ValueError("no checkpoints to sweep")
    for c in checkpoints:
        if c is not None and not os.path.isdir(c):
            raise ValueError(f"checkpoint directory {c!r} does not exist")
    mesh = mesh or parallel.make_mesh(config.model_parallel)
    first_model = default_model.load_model(checkpoints[0])
    res = load_resources(config, first_model.vae_cfg.image_size, first_model.var_cfg.num_classes)
    rows = []
    for i, ckpt in enumerate(checkpoints):
        name = f"{i:02d}_{os.path.basename(os.path.normpath(ckpt)) if ckpt else 'default'}"
        cfg_i = config
        if fid_to_first and i > 0:
            cfg_i = dataclasses.replace(config, ref_samples=rows[0]["samples_path"])
            res.ref_samples = metrics.load_reference_batch(cfg_i.ref_samples)
        log(f"sweep {i + 1}/{len(checkpoints)}: {ckpt or 'default'}")
        results = evaluate(ckpt, os.path.join(out_dir, name), cfg_i, mesh=mesh, resources=res,
                           model=first_model if i == 0 else None, log=log)
        rows.append({**_sweep_row(results), "samples_path": results["samples"]["path"]})
    table = [{k: v for k, v in r.items() if k != "samples_path"} for r in rows]
    if parallel.is_main_process():
        gen_lib.atomic_write(os.path.join(out_dir, "sweep.json"),
                              lambda f: f.write(json.dumps(table, indent=1).encode()))
        atomic_write(os.path.join(out_dir, "sweep.md"), sweep_markdown(table))
    return table
