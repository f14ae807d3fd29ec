"""The PTQ report: report.json plus a readable markdown table."""
import json
import os

from varq_jax.files import atomic_write


def _fmt_bops(x: float) -> str:
    return f"{x / 1e12:.3f} T" if x >= 1e11 else f"{x / 1e9:.3f} G"


def to_markdown(report: dict) -> str:
    c = report.get("config", {})
    lines = [f"# PTQ report: W{c.get('w_bits')}A{c.get('a_bits')} ({c.get('method')})", ""]
    if c.get("rules") or c.get("method_rules") or c.get("fp_modules"):
        lines += ["Mixed precision: per-site rules below; W/A in the title are the defaults.", ""]
    if report.get("model"):
        lines += [f"Model: {report['model']}", ""]
    lines += ["## Stages", "", "| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report.get("stages", {}).items()]
    if "theta" in report:
        lines += ["", f"θ (shift-and-sum threshold): {report['theta']:.6g}"
                  + (f" (before reconstruction {report['theta_before_reconstruction']:.6g})"
                     if "theta_before_reconstruction" in report and "reconstruction" in report else "")]
        if report.get("theta_note"):
            lines += ["", f"Note: {report['theta_note']}"]
    b = report.get("bops")
    if b:
        lines += ["", "## BOPs per image", "", "| FP32 | FP16 | quantized | + shift-and-sum | shift-and-sum share |",
                  "|---|---|---|---|---|",
                  f"| {_fmt_bops(b['fp32'])} | {_fmt_bops(b['fp16'])} | {_fmt_bops(b['quantized'])} | "
                  f"{_fmt_bops(b['quantized_with_sas'])} | {b['shift_and_sum_extra'] / b['quantized']:.2%} |"]
    sites = report.get("sites")
    if sites:
        lines += ["", "## Sites and their rules", "", "| site | rules matched | weights | input / operands | BOPs |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['site']} | {', '.join(f'`{p}`' for p in r['rules'])} | {r['weights']} | {r['acts']} | "
                  f"{_fmt_bops(r['bops'])} |" for r in sites]
    fm = report.get("frequency_mismatch")
    if fm:
        lines += ["", "## Calibration code-frequency mismatch (total variation) per scale", "",
                  "| scale | " + " | ".join(map(str, range(len(fm["before"])))) + " |",
                  "|---|" + "---|" * len(fm["before"]),
                  "| before resampling | " + " | ".join(f"{x:.4f}" for x in fm["before"]) + " |",
                  "| after resampling | " + " | ".join(f"{x:.4f}" for x in fm["after"]) + " |"]
    rec = report.get("reconstruction")
    if rec and rec.get("modules"):
        lines += ["", "## Reconstruction loss per module", "", "| module | start | end | time (s) |", "|---|---|---|---|"]
        for name, m in rec["modules"].items():
            lines.append(f"| {name} | {m.get('loss_start', float('nan')):.4g} | {m.get('loss_end', float('nan')):.4g} "
                         f"| {m.get('time_s', float('nan')):.1f} |")
    we, ae = report.get("weight_errors", {}), report.get("activation_errors", {})
    if we:
        lines += ["", "## Per-layer relative quantization error", "", "| layer | weight | input activation |",
                  "|---|---|---|"]
        for name in we:
            a = ae.get(name)
            lines.append(f"| {name} | {we[name]:.4f} | {'' if a is None else f'{a:.4f}'} |")
    if report.get("parameter_overview"):
        lines += ["", "## VAR parameters", "", "```", report["parameter_overview"], "```"]
    return "\n".join(lines) + "\n"


def write(out_dir: str, report: dict) -> None:
    for name, text in (("report.json", json.dumps(report, indent=1, default=float)), ("report.md", to_markdown(report))):
        atomic_write(os.path.join(out_dir, name), text)
