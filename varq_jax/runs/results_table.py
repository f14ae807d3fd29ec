"""The ablation results as a document: "what the numbers show", the markdown table, RESULTS.md + its JSON twin."""
import json
import os
from typing import List, Sequence

import numpy as np

from varq_jax.files import atomic_write
from varq_jax.runs import protocol


def write(out: str, result: dict) -> None:
    """out (markdown), its .json twin, and the rows' bootstrap values (`_values`) as .replicates.npz."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    for path, text in ((out, to_markdown(result)),
                       (os.path.splitext(out)[0] + ".json", json.dumps(public, indent=1, default=float))):
        atomic_write(path, text)
    if result.get("_values"):
        protocol.save_values(protocol.values_path(out), result["_values"])


# --- "what the numbers show": the diagnostics' part (the metrics' findings come from runs.protocol) -------------
def diagnostic_findings(diag: dict) -> List[str]:
    """The direction of the two diagnostics (A·V error per scale, calibration code-frequency mismatch)."""
    lines = []
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


def _with_interval(row: dict, key: str, fmt: str) -> str:
    i = row.get("intervals", {}).get(key)
    text = _num(row[key], fmt)
    return text if not i else f"{text} [{format(i['low'], fmt)}, {format(i['high'], fmt)}]"


def table(rows: Sequence[dict]) -> List[str]:
    """The main table; a merged table of several FP sets gets an 'FP set' column (its rows compare within it)."""
    sets = any("fp_set" in r for r in rows)
    lines = ["| model | method | calib. seed | class acc. | FD to real | FD to FP | BOPs | BOPs + SaS | θ | PTQ (s) | "
             "eval (s) |" + (" FP set |" if sets else ""), "|---|---|---|---|---|---|---|---|---|---|---|"
             + ("---|" if sets else "")]
    for r in rows:
        model = protocol.bits(r)
        seed = "–" if r.get("calib_seed") is None else str(r["calib_seed"])
        lines.append(f"| {model} | {r['method']} | {seed} | {_with_interval(r, 'class_accuracy', '.4f')} | "
                     f"{_with_interval(r, 'fd_real', '.4g')} | {_with_interval(r, 'fd_fp', '.4g')} | "
                     f"{_bops(r['bops_quantized'])} | {_bops(r['bops_with_sas'])} | {_num(r['theta'])} | "
                     f"{_secs(r['ptq_s'])} | {_secs(r['eval_s'])} |" + (f" {r['fp_set'] + 1} |" if sets else ""))
    return lines


def _images_line(result: dict) -> str:
    e, p = result["eval"], result["protocol"]
    sampling = (f"sampling CFG {e['cfg']}, top-k {e['top_k']} (clipped to the vocabulary), top-p {e['top_p']}, "
                f"{e['dtype']}" + (", quantized rows in integer execution (integer codes and GEMMs)"
                                   if e.get("execution", "simulate") == "int" else ""))
    noise = (f"; the FP model again with seeds {', '.join(map(str, p['noise_seeds']))} (the noise floor, row "
             f"'other seeds')" if p["noise_seeds"] else "")
    return (f"- Images: {result['num_images']} per model — seeds {', '.join(map(str, p['seeds']))} × "
            f"{p['images_per_seed']} images, image i of seed s from fold_in(key(s), i), label i mod classes, the same "
            f"for every row{noise}; {sampling}. Intervals: 95 % paired bootstrap percentiles, {p['replicates']} "
            f"replicates over image indices (the same for every row), Fréchet distances recomputed per replicate "
            f"(the real set fixed), each metric's replicates shifted to its estimate (resampling with replacement "
            f"inflates an FD); an FD's interval is its spread at this number of images, comparable across rows.\n"
            f"- Calibration: one set per calibration seed ({', '.join(map(str, p['calib_seeds']))}"
            + "".join(f"; {k}: also {', '.join(map(str, v))}" for k, v in p["extra_calib"].items())
            + f"), sampled in {p['calib_dtype']} (HIGHEST matmul precision for float32) by its first run and shared "
            f"by every row of that seed (fingerprints: "
            + ", ".join(sorted({f"seed {r['calib_seed']}: {r['calibration'][:12]}" for r in result["rows"]
                                if r.get("calibration")})) + ")")


def to_markdown(result: dict) -> str:
    e, clf = result["eval"], result["classifier"]
    lines = ["# Ablation: PTQ presets × methods", ""]
    if result["random_weights"]:
        lines += ["**The model has RANDOM WEIGHTS: these numbers say nothing about generation quality.**", ""]
    what = ("In-project metrics, **not FID** (no Inception network, no ImageNet): "
            + (f"the {clf.get('dataset', 'shapes')} classifier `{clf['path']}` (test accuracy "
               f"{clf['test_accuracy']:.4f}) gives the class accuracy of the samples w.r.t. their conditioning labels "
               f"and the Fréchet distance (FD) of its features to real {clf.get('dataset', 'shapes')} images (test "
               f"split, {e['num_real'] or result['num_images']} images) and to "
               f"the FP model's samples (same labels and keys). Lower FD is closer; the values are comparable "
               f"only within this table." if clf else
               "no classifier fits this model, so class accuracy and the Fréchet distances are missing (–)."))
    lines += [what, "",
              f"- Model: {result['model']} (checkpoint: {result['checkpoint']})",
              _images_line(result),
              f"- PTQ overrides: {', '.join(f'{k}={v}' for k, v in result['overrides'].items()) or 'none'}"]
    if result.get("parts"):
        lines.append(f"- Made in {len(result['parts'])} parts, separate invocations (side by side on one workdir, "
                     f"their PTQ and eval times then including shared devices and host CPUs, or one after another):")
        lines += [f"  - `{p['command']}` — {p['device']}, host {p['host']}, {p['date']}, jax {p['jax']}, "
                  f"{p['wall_s']:.0f} s" + (f", stopped by {p['stopped']} (its finished runs)" if p.get("stopped")
                                            else "")
                  + (f"; FP set {p['fp_set'] + 1}" if "fp_set" in p else "") for p in result["parts"]]
        lines.append(f"- Merged by `{result['command'] or '(library call)'}` — {result['device']}, host "
                     f"{result['host']}, {result['date']}, jax {result['jax']} "
                     f"(A·V diagnostic from {result['av_error_from']})")
        if result.get("not_run"):
            lines.append(f"- Rows of the planned table not run yet: {', '.join(result['not_run'])}")
        if result.get("zero_shot_not_run"):
            lines.append(f"- Zero-shot rows planned and not run yet: {', '.join(result['zero_shot_not_run'])}")
    else:
        lines += [f"- Device: {result['device']}, host {result['host']}, {result['date']}, jax {result['jax']}; "
                  f"wall time of this invocation {result['wall_s']:.0f} s",
                  f"- Command: `{result['command'] or '(library call)'}`"]
        if result.get("stopped"):
            lines.append(f"- **Stopped by {result['stopped']}**: the rows are the runs finished before it; not run: "
                         f"{', '.join(result['not_run']) or 'none'}"
                         + (f"; zero-shot rows not run: {', '.join(result['zero_shot_not_run'])}"
                            if result.get("zero_shot_not_run") else "")
                         + ". The same command again resumes the rest.")
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
    if result.get("zero_shot"):
        from varq_jax.runs import zero_shot_rows
        lines += [""] + zero_shot_rows.to_markdown(result["zero_shot"])
    return "\n".join(lines) + "\n"
