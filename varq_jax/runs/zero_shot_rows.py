"""Zero-shot rows of an ablation table: inpainting, outpainting and class-conditional editing of the same real
inputs by the FP model and chosen quantized runs, on the same keys (the paper's zero-shot claims, issue 18).

Per image: the kept region's PSNR and SSIM against the input, the classifier's features (FD to the inputs) and
class (the input's class for in/outpainting, the target class for editing). Paired bootstrap intervals over the
inputs as in the main table; the stated differences are baseline → full within a preset and calibration seed, on
every metric and task, Holm-adjusted over this family (apart from the main table's).

Layout: <workdir>/<run>/zero_shot/<task>/ (shards, samples.npz, per_image.npz), <run>/zero_shot/inputs.json.
"""
import dataclasses
import json
import os
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from varq_jax import data, default_model
from varq_jax.eval import evaluate as ev
from varq_jax.eval import paired, zero_shot
from varq_jax.files import atomic_write
from varq_jax.runs import protocol as protocol_lib

# (metric, title, lower is better)
METRICS = (("psnr_kept", "kept PSNR (dB)", False), ("ssim_kept", "kept SSIM", False),
           ("fd_inputs", "FD to inputs", True), ("class_accuracy", "class acc.", False))
MEANS = ("psnr_kept", "ssim_kept")
COMPARED = ("baseline", "full")                  # the method pair stated within a preset
INPUT_OFFSET = 100_000                           # test-split indices of the inputs: apart from the real set's


def value_name(task: str, row: str) -> str:
    """The key of a zero-shot row's bootstrap values in the table's .replicates.npz."""
    return f"zero_shot:{task}:{row}"


def make_inputs(dataset: str, num: int, model, config: ev.EvalConfig) -> dict:
    """`num` real test images of the classifier's dataset (indices from INPUT_OFFSET, label = index mod classes);
    the edit target of each is the next class (label + 1: the same texture and layout, another shape)."""
    if num < 2:
        raise ValueError(f"zero-shot rows need at least 2 input images, got {num}")
    images, labels = data.get(dataset).make_batch_uint8(0, np.arange(INPUT_OFFSET, INPUT_OFFSET + num),
                                                         split="test", image_size=model.vae_cfg.image_size)
    labels = np.asarray(labels, np.int32)
    return zero_shot.prepare_inputs(np.asarray(images), model, config, labels=labels,
                                    target_labels=(labels + 1) % model.var_cfg.num_classes)


def _stamp(inputs: dict, config: ev.EvalConfig, vocab_size: int) -> dict:
    return {"inputs": inputs["sha256"], "seed": config.seed, "tasks": list(config.tasks), "box": list(config.box),
            "sampling": json.loads(json.dumps(dataclasses.asdict(config.sampling_config(vocab_size)))), "dtype": config.dtype}


def evaluate_row(model, row_dir: str, inputs: dict, config: ev.EvalConfig, res: ev.Resources, mesh,
                 log: Callable) -> Dict[str, Dict[str, np.ndarray]]:
    """Every task of one model on the inputs (reused when done with the same inputs and settings):
    {task: per-image arrays}."""
    out_dir = os.path.join(row_dir, "zero_shot")
    stamp_path = os.path.join(out_dir, "inputs.json")
    stamp = _stamp(inputs, config, model.var_cfg.vocab_size)
    paths = {t: os.path.join(out_dir, t, ev.PER_IMAGE) for t in config.tasks}
    done = os.path.exists(stamp_path) and json.load(open(stamp_path)) == stamp
    if not (done and all(os.path.exists(p) for p in paths.values())):
        log(f"[{os.path.basename(row_dir)}] zero-shot tasks {', '.join(config.tasks)} ...")
        zero_shot.evaluate_zero_shot(model, out_dir, config, res, mesh, inputs, log)
        atomic_write(stamp_path, json.dumps(stamp, indent=1))
    else:
        log(f"[{os.path.basename(row_dir)}] zero-shot outputs exist: skipped")
    return {t: ev.load_per_image(p) for t, p in paths.items()}


def run_rows(fp_model, fp_dir: str, runs: Sequence[Tuple[dict, str, str]], inputs: dict, config: ev.EvalConfig,
             res: ev.Resources, mesh, protocol, log: Callable) -> Tuple[List[dict], dict]:
    """(rows, bootstrap values) of the FP model (outputs in fp_dir) and each (table row, run_dir, checkpoint) of
    `runs`, every task on the same inputs and keys (config.seed); needs `res.classifier`. The rows' estimates and
    intervals are set from the values by `set_intervals` (the table's conclusion, also after a merge)."""
    per_row = {"fp": (None, evaluate_row(fp_model, fp_dir, inputs, config, res, mesh, log))}
    for row, run_dir, checkpoint in runs:
        model = default_model.load_model(checkpoint, execution=config.execution)
        per_row[row["name"]] = (row, evaluate_row(model, run_dir, inputs, config, res, mesh, log))
    stamp = ("zero-shot-inputs", inputs["sha256"])
    ref = res.features(res.classifier, stamp, inputs["images"], mesh, config.feature_batch)["features"]
    indices = protocol_lib.replicate_indices(len(inputs["images"]), protocol)
    rows, values = [], {}
    for task in config.tasks:
        sets = {name: {"correct": d[task]["predicted"] == d[task]["labels"], "features": d[task]["features"],
                       **{m: d[task][m] for m in MEANS}} for name, (_, d) in per_row.items()}
        for name, v in paired.set_replicates(sets, ref, None, indices, MEANS, "fd_inputs").items():
            values[value_name(task, name)] = v
        for name, (row, _) in per_row.items():
            rows.append(_row(task, name, row))
    return rows, values


def _row(task: str, name: str, row) -> dict:
    base = {"name": "fp", "preset": "fp", "method": "–", "w_bits": None, "a_bits": None, "calib_seed": None}
    if row is not None:
        base = {k: row.get(k) for k in base}
    return {"task": task, **base}


def set_intervals(rows: Sequence[dict], values: Mapping) -> None:
    """Each row's estimates and intervals from the stored replicates (also after a merge)."""
    for r in rows:
        v = values.get(value_name(r["task"], r["name"]), {})
        for metric, _, _ in METRICS:
            if metric in v:
                r[metric] = float(v[metric][0])
        r["intervals"] = protocol_lib.row_intervals(v)


def fp_agreement(sections: Sequence[dict]) -> List[str]:
    """A note on how far apart the zero-shot FP rows of merged parts are (same inputs and keys, separate device
    sessions: other kernels round otherwise); none for one section. The table's FP rows are the first's, and each
    stated difference lies within one part, so no limit is imposed."""
    if len(sections) < 2:
        return []
    gaps = {}
    for task in sections[0]["tasks"]:
        fp = [next(r for r in z["rows"] if r["task"] == task and r["name"] == "fp") for z in sections]
        for metric, title, _ in METRICS:
            gaps[title] = max([gaps.get(title, 0.0)] + [abs(r[metric] - fp[0][metric]) for r in fp[1:]])
    return [f"the {len(sections)} parts with zero-shot rows sampled their FP rows in separate invocations (same "
            f"inputs and keys): they differ by at most " + ", ".join(f"{g:.4g} in {t}" for t, g in gaps.items())
            + "; the FP rows shown are the first part's, and each baseline → full difference is within one part"]


def comparisons(rows: Sequence[dict], values: Mapping, pair: Tuple[str, str] = COMPARED) -> List[dict]:
    """pair[0] → pair[1] (baseline → full) within each task, preset and calibration seed, on every metric; Holm
    over all of them."""
    out = []
    a, b = pair
    for task in dict.fromkeys(r["task"] for r in rows):
        q = [r for r in rows if r["task"] == task and r["preset"] != "fp"]
        for preset, cs, k in dict.fromkeys((r["preset"], r["calib_seed"], r.get("fp_set")) for r in q):
            by = {r["method"]: r for r in q if r["preset"] == preset and r["calib_seed"] == cs and r.get("fp_set") == k}
            if a in by and b in by:
                for metric, _, lower in METRICS:
                    c = protocol_lib.compare(f"{a} → {b}", preset, cs, value_name(task, by[a]["name"]),
                                             value_name(task, by[b]["name"]), metric, lower, values)
                    out.append(dict(protocol_lib.in_set(c, by[a]), task=task, a=by[a]["name"], b=by[b]["name"]))
    return protocol_lib.adjust(out)


def _cell(row: dict, metric: str) -> str:
    x, i = row.get(metric), row.get("intervals", {}).get(metric)
    if x is None:
        return "–"
    return f"{x:.4g}" + (f" [{i['low']:.4g}, {i['high']:.4g}]" if i else "")


def to_markdown(section: dict) -> List[str]:
    """The zero-shot section of the table: one table per task and the findings on baseline → full."""
    rows, comps = section["rows"], section["comparisons"]
    lines = ["## Zero-shot tasks", "",
             f"{section['num_inputs']} real test images (indices from {INPUT_OFFSET}), box {tuple(section['box'])}, "
             f"sampling seed {section['seed']}, the same inputs and keys for every row. Kept region: PSNR/SSIM of "
             f"the pixels outside the regenerated box (inside for outpainting) against the input; FD to inputs: "
             f"classifier features of the results against the inputs'; class accuracy w.r.t. the input's class "
             f"(edit: the target class, the input's label + 1). 95 % paired bootstrap intervals over the inputs. "
             f"LPIPS is not computed (no LPIPS network in the project).", ""]
    sets = any("fp_set" in r for r in rows)
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [f"### {task}", "", "| model | method | calib. seed | " + " | ".join(t for _, t, _ in METRICS) + " |"
                  + (" FP set |" if sets else ""), "|---|---|---|" + "---|" * (len(METRICS) + sets)]
        for r in (r for r in rows if r["task"] == task):
            model = protocol_lib.bits(r)
            lines.append(f"| {model} | {r['method']} | {r['calib_seed'] or '–'} | "
                         + " | ".join(_cell(r, m) for m, _, _ in METRICS) + " |"
                         + (f" {r['fp_set'] + 1} |" if sets else ""))
        lines.append("")
    tested = [c for c in comps if c["p_holm"] is not None]
    titles = {m: t for m, t, _ in METRICS}
    if comps:
        lines.append(f"- {len(tested)} zero-shot comparisons ({COMPARED[0]} → {COMPARED[1]} per task, preset and "
                     f"calibration seed, on {', '.join(titles.values())}); p-values Holm-adjusted over these "
                     f"{len(tested)}.")
    for c in comps:
        lo = "–" if c["low"] is None else f"{c['low']:+.4g}"
        hi = "–" if c["high"] is None else f"{c['high']:+.4g}"
        p = "–" if c["p_holm"] is None else f"{c['p_holm']:.3g}"
        lines.append(f"- {c['task']}, {c['preset'].upper()}"
                     + ("" if c["calib_seed"] is None else f", calib seed {c['calib_seed']}")
                     + protocol_lib.set_words(c)
                     + f", {c['what']}: {titles[c['metric']]} {c['estimate']:+.4g} [{lo}, {hi}] (Holm p {p}): {c['verdict']}.")
    if not comps:
        lines.append(f"- No {COMPARED[0]}/{COMPARED[1]} pair in these rows: no differences stated.")
    lines += [f"- Note: {n}" for n in section.get("notes", [])]
    return lines + [""]
