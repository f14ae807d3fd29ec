"""Does AdaRound do anything here? A reconstruction study on a few named units (issue 18).

For each (lr, λ) point — the official (1e-4, 1e-5) first — one PTQ run reconstructs only the named units (the rest
of the model stays at round-to-nearest), all on one shared calibration set; per unit it reports the fraction of
weights whose learned rounding differs from nearest, the unit's error with nearest and with the learned (hard)
rounding on the calibration data, and the whole model's teacher-forced KL to FP on held-out token maps (FP samples
of another calibration seed), with the all-nearest model as the reference row.
"""
import dataclasses
import json
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from varq_jax import default_model
from varq_jax.files import atomic_write
from varq_jax.quant import calibration, diagnostics, pipeline
from varq_jax.quant.export import load_quantized
from varq_jax.quant.units import target_by_name
from varq_jax.runs import quantize as quantize_run
from varq_jax.runs.ablation import environment

OFFICIAL = (1e-4, 1e-5)


@dataclasses.dataclass(frozen=True)
class Study:
    units: Tuple[str, ...]                                # reconstruction units, e.g. ("blocks_0/attn", "head")
    points: Tuple[Tuple[float, float], ...] = (OFFICIAL,)  # (recon.lr, recon.weight); ≤ 4 beside the official
    heldout_samples: int = 32                             # FP token maps the KL is measured on
    heldout_seed: int = 4242                              # their calibration seed (not the runs')

    def __post_init__(self):
        if not self.units:
            raise ValueError("name at least one reconstruction unit")
        if not 1 <= len(self.points) <= 5:
            raise ValueError(f"1 to 5 (lr, λ) points (the official and ≤ 4 more), got {len(self.points)}")
        for lr, weight in self.points:
            if not lr > 0 or weight < 0:
                raise ValueError(f"a point needs lr > 0 and λ ≥ 0, got ({lr}, {weight})")
        if self.heldout_samples < 1:
            raise ValueError(f"heldout_samples must be positive, got {self.heldout_samples}")


def _point_config(base, units, lr, weight):
    c = base.copy_and_resolve_references()
    c.recon.units, c.recon.lr, c.recon.weight = tuple(units), float(lr), float(weight)
    return c


def run_study(base_config, study: Study, workdir: str, out: str, *, checkpoint: Optional[str] = None,
              command: str = "", log: Callable = print) -> dict:
    """Runs the study (each point resumable in workdir/point_<i>) and writes `out` (markdown) and its .json."""
    if not base_config.reconstruction or base_config.rounding != "adaround":
        raise ValueError("the study needs a method with AdaRound reconstruction (e.g. --config=w4a4:brecq)")
    if not out.endswith(".md"):
        raise ValueError(f"out must be a markdown file (.md), got {out!r}")
    checkpoint = default_model.resolve(checkpoint)
    fp = default_model.load_model(checkpoint)
    if fp.policy is not None:
        raise ValueError("the study starts from a full-precision checkpoint")
    for u in study.units:
        target_by_name(fp.var_cfg, u)                       # a clear error naming the valid units
    configs = [_point_config(base_config, study.units, lr, w) for lr, w in study.points]
    for c in configs:
        pipeline.validate_config(c, fp.var_cfg)
    held = calibration.generate_calibration(
        fp.vae_cfg, fp.var_cfg, fp.params,
        calibration.calibration_labels(study.heldout_samples, fp.var_cfg.num_classes, study.heldout_seed),
        study.heldout_seed, pipeline.calib_settings(base_config, fp.var_cfg), base_config.calib.batch_size,
        pipeline.DTYPES[base_config.dtype], keep_probs=False)
    rows, shared = [], None
    nearest_kl = None
    for i, (c, (lr, weight)) in enumerate(zip(configs, study.points)):
        ptq_dir = os.path.join(workdir, f"point_{i}")
        log(f"=== point {i + 1}/{len(configs)}: lr {lr:g}, λ {weight:g} ===")
        report = _quantize(c, checkpoint, ptq_dir, shared, log)
        shared = shared or ptq_dir
        q = load_quantized(os.path.join(ptq_dir, "model"))
        kl = diagnostics.teacher_forced_kl(fp, q, held.labels, held.tokens, base_config.calib.batch_size)
        if nearest_kl is None:
            near = load_quantized(os.path.join(ptq_dir, "model"))
            near.params = {**near.params, "var": _nearest_params(fp, near)}
            nearest_kl = diagnostics.teacher_forced_kl(fp, near, held.labels, held.tokens,
                                                       base_config.calib.batch_size)
        modules = report["reconstruction"]["modules"]
        for u in study.units:
            flips = diagnostics.rounding_flips(fp.params["var"], q, prefix=u)
            m = modules[u]
            rows.append({"point": i, "lr": lr, "weight": weight, "unit": u,
                         "flipped": float(np.mean(list(flips.values()))) if flips else None,
                         "flipped_per_site": flips, "error_nearest": m["error_nearest"],
                         "error_hard": m["error_hard"], "loss_start": m["loss_start"], "loss_end": m["loss_end"],
                         "model_kl": kl})
    result = {"model": default_model.describe(fp), "checkpoint": checkpoint or "default (embedded)",
              "config": {k: v for k, v in base_config.to_dict().items() if k in ("w_bits", "a_bits", "method")},
              "recon_iters": base_config.recon.iters, "units": list(study.units),
              "points": [list(p) for p in study.points], "heldout": {"samples": study.heldout_samples,
                                                                     "seed": study.heldout_seed},
              "nearest_model_kl": nearest_kl, "rows": rows, "command": command, **environment()}
    atomic_write(out, to_markdown(result))
    atomic_write(os.path.splitext(out)[0] + ".json", json.dumps(result, indent=1))
    log(f"wrote {out}")
    return result


def _quantize(config, checkpoint, ptq_dir, shared, log) -> dict:
    report_path = os.path.join(ptq_dir, "report.json")
    if os.path.exists(report_path) and os.path.isdir(os.path.join(ptq_dir, "model")):
        log(f"  {ptq_dir}: done, reused")
        return json.load(open(report_path))
    quantize_run.quantize_command(config, checkpoint, ptq_dir, log=log, calibration=shared)
    return json.load(open(report_path))


def _nearest_params(fp, q) -> dict:
    """The quantized model's kernels at round-to-nearest (its grids, the FP weights): the no-reconstruction row."""
    from flax import traverse_util
    from varq_jax.quant import state
    flat_fp = traverse_util.flatten_dict(fp.params["var"])
    flat_q = dict(traverse_util.flatten_dict(q.params["var"]))
    for path, node in diagnostics._quant_nodes(q.quant):
        rule = q.policy.rule_for("/".join(path))
        if "delta" in node and rule.weights and path + ("kernel",) in flat_fp:
            codes = state.integer_codes(flat_fp[path + ("kernel",)], node, rule.w_bits, learned=False)
            flat_q[path + ("kernel",)] = np.asarray(state.dequantize(codes, node), flat_q[path + ("kernel",)].dtype)
    return traverse_util.unflatten_dict(flat_q)


def to_markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"# Reconstruction study: W{c['w_bits']}A{c['a_bits']}, units {', '.join(result['units'])}", "",
             f"- Model: {result['model']} (checkpoint: {result['checkpoint']})",
             f"- {result['recon_iters']} AdaRound iterations per unit; every point on the first point's calibration "
             f"set; the other units at round-to-nearest",
             f"- Teacher-forced KL(FP ‖ quantized) per token on {result['heldout']['samples']} held-out FP token "
             f"maps (calibration seed {result['heldout']['seed']}), true labels, no CFG; all units at "
             f"round-to-nearest: {result['nearest_model_kl']:.5g}",
             f"- {result['device']}, {result['date']}, jax {result['jax']}; `{result['command'] or '(library call)'}`",
             "", "| lr | λ | unit | flipped roundings | error, nearest | error, learned (hard) | change | model KL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        change = (None if r["error_nearest"] in (None, 0) or r["error_hard"] is None
                  else r["error_hard"] / r["error_nearest"] - 1)
        lines.append(f"| {r['lr']:g} | {r['weight']:g} | {r['unit']} | "
                     f"{'–' if r['flipped'] is None else format(r['flipped'], '.2%')} | {_n(r['error_nearest'])} | "
                     f"{_n(r['error_hard'])} | {'–' if change is None else format(change, '+.1%')} | "
                     f"{r['model_kl']:.5g} |")
    return "\n".join(lines) + "\n"


def _n(x) -> str:
    return "–" if x is None else f"{x:.5g}"


def parse_points(items: Sequence[str]) -> List[Tuple[float, float]]:
    """'LR:LAMBDA' strings (the CLI's --points)."""
    out = []
    for item in items:
        lr, sep, weight = item.partition(":")
        try:
            if not sep:
                raise ValueError
            out.append((float(lr), float(weight)))
        except ValueError:
            raise ValueError(f"a point is LR:LAMBDA (e.g. 1e-4:1e-5), got {item!r}") from None
    return out
