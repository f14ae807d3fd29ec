"""The ablation results as a document: "what the numbers show", the markdown table, RESULTS.md + its JSON twin."""
import json
import os
from typing import List, Sequence

import numpy as np

from varq_jax.files import atomic_write

# (what is compared, from method, to method): the lines of "what the numbers show"
COMPARISONS = (("reconstruction", "baseline", "brecq"),
               ("shift-and-sum", "brecq", "brecq_sas"),
               ("resampling", "brecq", "brecq_resample"),
               ("shift-and-sum on top of resampling", "brecq_resample", "full"),
               ("resampling on top of shift-and-sum", "brecq_sas", "full"),
               ("both", "brecq", "full"))
# (row key, column title, True when lower is better)
METRICS = (("fd_fp", "FD to FP", True), ("fd_real", "FD to real", True), ("class_accuracy", "class accuracy", False))


def write(out: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for path, text in ((out, to_markdown(result)),
                       (os.path.splitext(out)[0] + ".json", json.dumps(result, indent=1, default=float))):
        atomic_write(path, text)


# --- "what the numbers show" -------------------------------------------------------------------------------------
def _bits(row: dict) -> str:
    return f"W{row['w_bits']}A{row['a_bits']}"


def _cmp(name: str, lower_better: bool, a: float, b: float) -> str:
    if b == a:
        verdict = "equal"
    else:
        verdict = "better" if (b < a) == lower_better else "worse"
    return f"{name} {_num(a)} → {_num(b)} ({verdict})"


def findings(rows: Sequence[dict], diag: dict) -> List[str]:
    """Statements read off the numbers: per bit setting the best method on each metric, each comparison of
    COMPARISONS, how often it improved each metric, and the diagnostics' direction."""
    lines = []
    q = [r for r in rows if r["preset"] != "fp"]
    presets = list(dict.fromkeys(r["preset"] for r in q))
    metric_keys = [m for m in METRICS if any(r[m[0]] is not None for r in q)]
    for p in presets:
        pr = [r for r in q if r["preset"] == p]
        if len(pr) < 2:
            continue
        best = []
        for key, title, lower in metric_keys:
            vals = [r for r in pr if r[key] is not None]
            if vals:
                top = (min if lower else max)(r[key] for r in vals)
                best.append(f"{title}: {', '.join(r['method'] for r in vals if r[key] == top)} ({_num(top)})")
        if best:
            lines.append(f"{_bits(pr[0])}: best " + "; best ".join(best) + ".")
    for label, a, b in COMPARISONS:
        changes = {key: [] for key, _, _ in metric_keys}
        for p in presets:
            ra = next((r for r in q if r["preset"] == p and r["method"] == a), None)
            rb = next((r for r in q if r["preset"] == p and r["method"] == b), None)
            if ra is None or rb is None:
                continue
            parts = [_cmp(title, lower, ra[key], rb[key]) for key, title, lower in metric_keys
                     if ra[key] is not None and rb[key] is not None]
            for key, _, lower in metric_keys:
                if ra[key] is not None and rb[key] is not None:
                    changes[key].append((_bits(ra), (rb[key] < ra[key]) if lower else (rb[key] > ra[key])))
            if parts:
                lines.append(f"{_bits(ra)}, {label} ({a} → {b}): " + ", ".join(parts) + ".")
        for key, title, _ in metric_keys:
            ch = changes[key]
            if len(ch) > 1:
                yes, no = [b_ for b_, ok in ch if ok], [b_ for b_, ok in ch if not ok]
                lines.append(f"{label} ({a} → {b}) improved {title} at {len(yes)} of {len(ch)} bit settings"
                             + (f" ({', '.join(yes)})" if yes else "") + (f"; not at {', '.join(no)}" if no else "")
                             + ".")
    fp = next((r for r in rows if r["preset"] == "fp" and r["class_accuracy"] is not None), None)
    if fp is not None and q:
        se = float(np.sqrt(fp["class_accuracy"] * (1 - fp["class_accuracy"]) / fp["num_images"]))
        lines.append(f"Noise level: over {fp['num_images']} images a class accuracy near {fp['class_accuracy']:.3f} "
                     f"has a binomial standard error of {se:.3f}, so accuracy differences below about {2 * se:.3f} "
                     f"are within sampling noise.")
    for d in diag.get("av_error", []):
        s, p = d["shift_and_sum"], d["plain"]
        lower = sum(x < y for x, y in zip(s, p))
        equal = sum(x == y for x, y in zip(s, p))
        lines.append(f"A{d['a_bits']} (θ = {d['theta']:.4g}): A·V error with shift-and-sum below plain rounding at "
                     f"{lower} of {len(s)} scales" + (f", equal at {equal}" if equal else "")
                     + f"; summed over scales {sum(s):.4g} vs {sum(p):.4g}.")
    for fm in diag.get("frequency_mismatch", []):
        lower = sum(a < b for a, b in zip(fm["after"], fm["before"]))
        lines.append(f"{fm['run']}: resampling lowered the code-frequency mismatch at {lower} of "
                     f"{len(fm['before'])} scales (mean {np.mean(fm['before']):.4f} → {np.mean(fm['after']):.4f}).")
    return lines


# --- markdown -------------------------------------------------------------------------------------------------------
def _num(x, fmt: str = ".4g") -> str:
    return "–" if x is None else format(x, fmt)


def _bops(x) -> str:
    return "–" if x is None else f"{x / 1e9:.3f} G"


def _secs(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def table(rows: Sequence[dict]) -> List[str]:
    lines = ["| model | method | class acc. | FD to real | FD to FP | BOPs | BOPs + SaS | θ | PTQ (s) | eval (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        model = "FP" if r["preset"] == "fp" else _bits(r)
        lines.append(f"| {model} | {r['method']} | {_num(r['class_accuracy'], '.4f')} | {_num(r['fd_real'])} | "
                     f"{_num(r['fd_fp'])} | {_bops(r['bops_quantized'])} | {_bops(r['bops_with_sas'])} | "
                     f"{_num(r['theta'])} | {_secs(r['ptq_s'])} | {_secs(r['eval_s'])} |")
    return lines


def to_markdown(result: dict) -> str:
    e, clf = result["eval"], result["classifier"]
    lines = ["# Ablation: PTQ presets × methods", ""]
    if result["random_weights"]:
        lines += ["**The model has RANDOM WEIGHTS: these numbers say nothing about generation quality.**", ""]
    what = ("In-project metrics, **not FID** (no Inception network, no ImageNet): "
            + (f"the shapes classifier `{clf['path']}` (test accuracy {clf['test_accuracy']:.4f}) gives the class "
               f"accuracy of the samples w.r.t. their conditioning labels and the Fréchet distance (FD) of its "
               f"features to real shapes images (test split, {e['num_real'] or result['num_images']} images) and to "
               f"the FP model's samples (same labels and keys). Lower FD is closer; the values are comparable "
               f"only within this table." if clf else
               "no classifier fits this model, so class accuracy and the Fréchet distances are missing (–)."))
    lines += [what, "",
              f"- Model: {result['model']} (checkpoint: {result['checkpoint']})",
              f"- Images: {result['num_images']} per model, labels i mod classes, keys from seed {e['seed']}; "
              f"sampling CFG {e['cfg']}, top-k {e['top_k']} (clipped to the vocabulary), top-p {e['top_p']}, "
              f"{e['dtype']}",
              f"- PTQ overrides: {', '.join(f'{k}={v}' for k, v in result['overrides'].items()) or 'none'}"]
    if result.get("parts"):
        lines.append(f"- Made in {len(result['parts'])} parts, invocations that ran side by side on one workdir "
                     f"(their PTQ and eval times include sharing devices and host CPUs):")
        lines += [f"  - `{p['command']}` — {p['device']}, host {p['host']}, {p['date']}, jax {p['jax']}, "
                  f"{p['wall_s']:.0f} s" for p in result["parts"]]
        lines.append(f"- Merged by `{result['command'] or '(library call)'}` — {result['device']}, host "
                     f"{result['host']}, {result['date']}, jax {result['jax']} "
                     f"(A·V diagnostic from {result['av_error_from']})")
    else:
        lines += [f"- Device: {result['device']}, host {result['host']}, {result['date']}, jax {result['jax']}; "
                  f"wall time of this invocation {result['wall_s']:.0f} s",
                  f"- Command: `{result['command'] or '(library call)'}`"]
    lines.append("")
    lines += table(result["rows"])
    lines += ["", "BOPs per image (the FP row: 16-bit BOPs); BOPs + SaS adds the shift-and-sum products at θ "
              "(θ only for shift-and-sum runs). PTQ time is the quantize run's total (of its last, possibly resumed, "
              "invocation); eval time covers generation and metrics.", ""]
    for n in result.get("eval_notes", []):
        lines.append(f"Note: {n}")
    diag = result["diagnostics"]
    lines += ["", "## Diagnostics", ""]
    for d in diag["av_error"]:
        s = len(d["plain"])
        lines += [f"### A·V relative L2 error per scale, A{d['a_bits']} (θ = {d['theta']:.6g}, {d['theta_from']}; "
                  f"{d['num_samples']} calibration samples ×2 for CFG, tokens from {d['tokens_from']})", "",
                  "| scale | " + " | ".join(map(str, range(s))) + " |", "|---|" + "---|" * s,
                  "| plain rounding | " + " | ".join(f"{x:.4f}" for x in d["plain"]) + " |",
                  "| shift-and-sum | " + " | ".join(f"{x:.4f}" for x in d["shift_and_sum"]) + " |", ""]
    if not diag["av_error"]:
        lines += ["A·V error: not computed (diag_samples = 0).", ""]
    if diag["frequency_mismatch"]:
        s = len(diag["frequency_mismatch"][0]["before"])
        lines += ["### Calibration code-frequency mismatch (total variation) per scale", "",
                  "| run | | " + " | ".join(map(str, range(s))) + " |", "|---|---|" + "---|" * s]
        for fm in diag["frequency_mismatch"]:
            lines += [f"| {fm['run']} | before resampling | " + " | ".join(f"{x:.4f}" for x in fm["before"]) + " |",
                      f"| {fm['run']} | after resampling | " + " | ".join(f"{x:.4f}" for x in fm["after"]) + " |"]
        lines.append("")
    else:
        lines += ["Frequency mismatch: no run resampled its calibration data.", ""]
    lines += ["## What the numbers show", ""] + [f"- {x}" for x in result["findings"]]
    return "\n".join(lines) + "\n"
