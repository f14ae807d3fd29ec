"""The ablation table: PTQ presets × methods on one FP checkpoint, evaluated alike, in one markdown table.

`run_ablation` quantizes the model once per (preset, method) with `workflow.quantize_command` (each run in its own
directory under `workdir`, skipped when its outputs exist, resumed when they are partial), evaluates the FP model
and every quantized checkpoint with `evaluate.evaluate` on the same labels and keys (the FP samples are the
reference of the "FD to FP" column), adds the two diagnostics of `diagnostics`, and writes `out` (markdown) and
the same numbers as JSON beside it. Every name, override and setting is checked before any work.

Layout of `workdir`: fp/eval/, <preset>_<method>/ptq/ (model/, report.json, state/), <preset>_<method>/eval/;
<run>/ptq_config.json is the run's PTQ config (a rerun with another config is refused: the PTQ stages resume from
disk), <run>/eval_time.json its evaluation wall time (so a skipped run still reports it).
"""
import ast
import dataclasses
import datetime
import json
import os
import socket
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np

from configs import ptq as ptq_configs
from varq_jax import cli, default_model, parallel
from varq_jax.eval import evaluate as ev
from varq_jax.eval import metrics
from varq_jax.quant import calibration, diagnostics, pipeline, state, theta as theta_lib, workflow

METHODS = tuple(ptq_configs.METHODS)
# fields that name what a row is: set by the preset and method, never by an override
ROW_FIELDS = ("quantize", "w_bits", "a_bits", "method") + tuple(next(iter(ptq_configs.METHODS.values())))
SAS_METHODS = ("full", "brecq_sas")                 # runs whose θ the A·V diagnostic uses, in this order
EVAL_TIME = "eval_time.json"
PTQ_CONFIG = "ptq_config.json"
# (what is compared, from method, to method): the lines of "what the numbers show"
COMPARISONS = (("reconstruction", "baseline", "brecq"),
               ("shift-and-sum", "brecq", "brecq_sas"),
               ("resampling", "brecq", "brecq_resample"),
               ("shift-and-sum on top of resampling", "brecq_resample", "full"),
               ("resampling on top of shift-and-sum", "brecq_sas", "full"),
               ("both", "brecq", "full"))
# (row key, column title, True when lower is better)
METRICS = (("fd_fp", "FD to FP", True), ("fd_real", "FD to real", True), ("class_accuracy", "class accuracy", False))


@dataclasses.dataclass
class Run:
    preset: str
    method: str
    config: Any                                    # the PTQ ConfigDict, overrides applied

    @property
    def name(self) -> str:
        return f"{self.preset}_{self.method}"


# --- configs ----------------------------------------------------------------------------------------------------
def quantized_presets() -> List[str]:
    return [p for p in cli.presets() if p != "fp"]


def _parse_value(text: str, current):
    """A command-line string as the type of the field it overrides (bool, int, float, tuple, or str)."""
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, (tuple, list)):
        if text.strip()[:1] in "([":
            return tuple(ast.literal_eval(text))
        return tuple(x for x in text.split(",") if x)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides: Mapping[str, Any], preset: str = "the preset"):
    """config with `overrides` {dotted.field: value} set; strings are parsed as the field's type. Unknown fields
    and values of the wrong type are ValueErrors naming the field."""
    fixed = [f for f in overrides if f in ROW_FIELDS]
    if fixed:
        raise ValueError(f"config field(s) {', '.join(fixed)} are set by the preset and method of each row; "
                         f"choose them with the presets and methods lists instead")
    valid = cli._fields(config)
    unknown = [f for f in overrides if f not in valid]
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)} for {preset}; valid fields: {', '.join(valid)}")
    config = config.copy_and_resolve_references()
    for field, value in overrides.items():
        *parents, leaf = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        try:
            node[leaf] = _parse_value(value, node[leaf]) if isinstance(value, str) else value
        except (ValueError, TypeError, SyntaxError) as e:
            raise ValueError(f"bad value {value!r} for config field {field} (a {type(node[leaf]).__name__}): "
                             f"{e}") from None
    return config


def parse_override_args(args: Sequence[str], flag: str = "config") -> Dict[str, str]:
    """['--config.recon.iters=5', ...] → {'recon.iters': '5'}."""
    out = {}
    for a in args:
        if not a.startswith(f"--{flag}.") or "=" not in a:
            raise ValueError(f"overrides must look like --{flag}.field=value, got {a!r}")
        field, value = a[len(flag) + 3:].split("=", 1)
        out[field] = value
    return out


def plan(presets: Sequence[str], methods: Sequence[str], overrides: Mapping[str, Any] = ()) -> List[Run]:
    """The runs, preset-major, with their configs; bad names or overrides are ValueErrors (nothing has run)."""
    presets, methods, overrides = list(presets), list(methods), dict(overrides)
    if not presets or not methods:
        raise ValueError("give at least one preset and one method")
    valid = quantized_presets()
    bad = [p for p in presets if p not in valid]
    if bad:
        extra = " ('fp' is always the first row)" if "fp" in bad else ""
        raise ValueError(f"unknown preset(s) {', '.join(bad)}{extra}; valid presets: {', '.join(valid)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; valid methods: {', '.join(METHODS)}")
    for name, items in (("preset", presets), ("method", methods)):
        dup = sorted({x for x in items if items.count(x) > 1})
        if dup:
            raise ValueError(f"{name}(s) listed twice: {', '.join(dup)}")
    runs = []
    for p in presets:
        for m in methods:
            try:
                config = cli.load_config(cli.resolve_config(f"{p}:{m}"))
            except SystemExit as e:                    # the CLI helpers exit with a message; here it is bad input
                raise ValueError(str(e).removeprefix("error: ")) from None
            config = apply_overrides(config, overrides, f"{p}:{m}")
            if not config.quantize:
                raise ValueError(f"preset {p} does not quantize; list quantized presets only")
            runs.append(Run(p, m, config))
    return runs


def _json_config(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=float))


def check_runs(runs: Sequence[Run], var_cfg, workdir: str) -> None:
    """Each config is valid for the model, and no run in `workdir` was started with another config."""
    for r in runs:
        pipeline.validate_config(r.config, var_cfg)
        path = os.path.join(workdir, r.name, PTQ_CONFIG)
        if os.path.exists(path):
            old, new = json.load(open(path)), _json_config(r.config)
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise ValueError(f"{os.path.join(workdir, r.name)} holds a run started with another config (differs "
                                 f"in {', '.join(diff)}): use another workdir or delete that directory")


# --- one run ----------------------------------------------------------------------------------------------------
def _ptq(run: Run, checkpoint: Optional[str], run_dir: str, log: Callable) -> dict:
    ptq_dir = os.path.join(run_dir, "ptq")
    report_path = os.path.join(ptq_dir, "report.json")
    if os.path.exists(report_path) and os.path.isdir(os.path.join(ptq_dir, "model")):
        log(f"[{run.name}] PTQ outputs exist: skipped")
        return json.load(open(report_path))
    log(f"[{run.name}] PTQ ...")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, PTQ_CONFIG), "w") as f:      # before any work: a resumed run must match it
        json.dump(_json_config(run.config), f, indent=1)
    workflow.quantize_command(run.config, checkpoint, ptq_dir, log=log)
    return json.load(open(report_path))        # what was written (JSON types), as a skipped run would read it


def _eval_reusable(results: dict, config: ev.EvalConfig, num_images: int, vocab_size: int) -> bool:
    s = results.get("samples", {})
    settings = json.loads(json.dumps(dataclasses.asdict(config.sampling_config(vocab_size))))
    return (s.get("num_images") == num_images and s.get("seed") == config.seed and s.get("dtype") == config.dtype
            and s.get("sampling") == settings and results.get("metrics")
            and results.get("references", {}).get("ref_samples") == config.ref_samples)


def _evaluate(checkpoint: Optional[str], run_dir: str, config: ev.EvalConfig, res: ev.Resources, num_images: int,
              vocab_size: int, mesh, log: Callable, model=None):
    """results.json of the run's evaluation (reused when it matches the settings) and its wall time."""
    out_dir = os.path.join(run_dir, "eval")
    results_path, time_path = os.path.join(out_dir, ev.RESULTS), os.path.join(run_dir, EVAL_TIME)
    if os.path.exists(results_path) and os.path.exists(time_path):
        results = json.load(open(results_path))
        if _eval_reusable(results, config, num_images, vocab_size):
            log(f"[{os.path.basename(run_dir)}] evaluation outputs exist: skipped")
            return results, json.load(open(time_path))["seconds"]
    t = time.perf_counter()
    ev.evaluate(checkpoint, out_dir, config, mesh=mesh, resources=res, model=model, log=log)
    seconds = round(time.perf_counter() - t, 3)
    with open(time_path, "w") as f:
        json.dump({"seconds": seconds}, f)
    return json.load(open(results_path)), seconds


def _row(name: str, preset: str, method: str, results: dict, eval_s: float, report: Optional[dict],
         w_bits=None, a_bits=None, bops=None) -> dict:
    m = results.get("metrics", {})
    row = {"name": name, "preset": preset, "method": method, "w_bits": w_bits, "a_bits": a_bits,
           "class_accuracy": m.get("class_accuracy"), "fd_real": m.get("fd_classifier_real"),
           "fd_fp": m.get("fd_classifier_vs_ref_samples"), "eval_s": eval_s,
           "num_images": results["samples"]["num_images"]}
    if report is not None:
        row.update(bops_quantized=report["bops"]["quantized"], bops_with_sas=report["bops"]["quantized_with_sas"],
                   theta=report.get("theta"), ptq_s=report["stages"]["total"])
    else:
        row.update(bops_quantized=bops, bops_with_sas=None, theta=None, ptq_s=None)
    return row


# --- diagnostics --------------------------------------------------------------------------------------------------
def _calibration_tokens(ck, runs: Sequence[Run], workdir: str, num: int):
    """The first `num` calibration token maps of a run that did not resample (else freshly generated alike)."""
    for r in runs:
        wd = os.path.join(workdir, r.name, "ptq", "state")
        rec = os.path.join(wd, "stages.json")
        if os.path.exists(rec) and json.load(open(rec)).get("calibration", {}).get("resampled") is False:
            arrays = pipeline.Workdir(wd).load_arrays("calibration")
            n = min(num, len(arrays["labels"]))
            return arrays["labels"][:n], [arrays[f"tokens_{s}"][:n] for s in range(ck.var_cfg.num_scales)], r.name
    c = runs[0].config
    n = min(num, c.calib.num_samples)
    labels = calibration.calibration_labels(c.calib.num_samples, ck.var_cfg.num_classes, c.calib.seed)[:n]
    cal = calibration.generate_calibration(ck.vae_cfg, ck.var_cfg, ck.params, labels, c.calib.seed,
                                           pipeline.calib_settings(c, ck.var_cfg), c.calib.batch_size,
                                           pipeline.DTYPES[c.dtype], keep_probs=False)
    return cal.labels, cal.tokens, "generated"


def _search_theta(ck, config) -> float:
    """θ as the pipeline searches it before reconstruction (min-max weights, round to nearest)."""
    policy = dataclasses.replace(pipeline.policy_from_config(config), phase="nearest", shift_and_sum=True)
    quant = state.init_quant_state(ck.params["var"], policy)
    n = config.theta.num_samples
    labels = calibration.calibration_labels(config.calib.num_samples, ck.var_cfg.num_classes, config.calib.seed)[:n]
    keys = calibration.per_image_keys(config.calib.seed + 1, np.arange(n))
    means, counts, bits = theta_lib.attention_statistics(ck.vae_cfg, ck.var_cfg, ck.params, quant, policy, labels,
                                                         keys, pipeline.calib_settings(config, ck.var_cfg),
                                                         pipeline.DTYPES[config.dtype])
    theta, _ = theta_lib.search(ck.var_cfg, means, counts, bits, policy, config.theta.alpha, config.theta.n_grids)
    return theta


def run_diagnostics(ck, runs: Sequence[Run], reports: Mapping[str, dict], workdir: str, num_samples: int,
                    log: Callable) -> dict:
    """A·V error per scale for every a_bits of the runs (θ of their shift-and-sum run, else searched) and the
    frequency mismatch of every resampling run."""
    out = {"av_error": [], "frequency_mismatch": []}
    if num_samples > 0:
        labels, tokens, source = _calibration_tokens(ck, runs, workdir, num_samples)
        for a_bits in sorted({r.config.a_bits for r in runs}, reverse=True):
            same = [r for r in runs if r.config.a_bits == a_bits]
            sas = [r for m in SAS_METHODS for r in same if r.method == m and reports[r.name].get("theta")]
            if sas:
                theta, theta_from = float(reports[sas[0].name]["theta"]), f"{sas[0].name} run"
            else:
                theta, theta_from = _search_theta(ck, same[0].config), f"searched with {same[0].preset}'s config"
            log(f"[diagnostics] A·V error at A{a_bits}, θ = {theta:.6g} ({theta_from})")
            d = diagnostics.av_error(ck, labels, tokens, a_bits, theta)
            d.update(theta_from=theta_from, tokens_from=source)
            out["av_error"].append(d)
    for r in runs:
        fm = diagnostics.frequency_mismatch(reports[r.name])
        if fm is not None:
            out["frequency_mismatch"].append({"run": r.name, **fm})
    return out


# --- the whole table ----------------------------------------------------------------------------------------------
def environment() -> dict:
    d = jax.devices()[0]
    return {"device": f"{jax.device_count()} × {d.device_kind} ({d.platform})", "host": socket.gethostname(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "jax": jax.__version__}


def run_ablation(presets: Sequence[str], methods: Sequence[str], eval_config: ev.EvalConfig, workdir: str,
                 out: str, *, checkpoint: Optional[str] = None, overrides: Mapping[str, Any] = (),
                 diag_samples: int = 8, command: str = "", log: Callable = print) -> dict:
    """The FP model and every (preset, method) run: PTQ, evaluation, diagnostics; writes `out` (markdown) and its
    .json twin. Returns what the JSON holds."""
    runs = plan(presets, methods, overrides)
    if eval_config.ref_samples:
        raise ValueError("the ablation sets ref_samples itself (the FP model's samples); leave it empty")
    if eval_config.dtype not in ev.DTYPES:
        raise ValueError(f"dtype must be one of {sorted(ev.DTYPES)}, got {eval_config.dtype!r}")
    if diag_samples < 0:
        raise ValueError(f"diag_samples must be >= 0, got {diag_samples}")
    if not out.endswith(".md"):
        raise ValueError(f"out must be a markdown file (.md), got {out!r}")
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint directory {checkpoint!r} does not exist")
    ck = default_model.load_model(checkpoint)
    if ck.policy is not None:
        raise ValueError(f"{checkpoint} is a quantized checkpoint; the ablation starts from a full-precision one")
    check_runs(runs, ck.var_cfg, workdir)
    res = ev.load_resources(eval_config, ck.vae_cfg.image_size, ck.var_cfg.num_classes)
    num_images = eval_config.num_images or eval_config.num_per_class * ck.var_cfg.num_classes
    vocab = ck.var_cfg.vocab_size
    mesh = parallel.make_mesh(eval_config.model_parallel)
    started = time.perf_counter()

    fp_dir = os.path.join(workdir, "fp")
    log("[fp] evaluation ...")
    fp_results, fp_s = _evaluate(checkpoint, fp_dir, eval_config, res, num_images, vocab, mesh, log, model=ck)
    fp_bops = pipeline.bops_report(ck.var_cfg, None)["fp16"]
    rows = [_row("fp", "fp", "–", fp_results, fp_s, None, bops=fp_bops)]
    q_config = dataclasses.replace(eval_config, ref_samples=fp_results["samples"]["path"])
    res.ref_samples = metrics.load_reference_batch(q_config.ref_samples)
    reports = {}
    for i, r in enumerate(runs):
        log(f"=== {i + 1}/{len(runs)}: {r.name} ===")
        run_dir = os.path.join(workdir, r.name)
        reports[r.name] = _ptq(r, checkpoint, run_dir, log)
        results, eval_s = _evaluate(os.path.join(run_dir, "ptq", "model"), run_dir, q_config, res, num_images,
                                    vocab, mesh, log)
        rows.append(_row(r.name, r.preset, r.method, results, eval_s, reports[r.name], r.config.w_bits,
                         r.config.a_bits))
    diag = run_diagnostics(ck, runs, reports, workdir, diag_samples, log)
    result = {
        "model": default_model.describe(ck), "checkpoint": checkpoint or "default (embedded)",
        "random_weights": bool(ck.meta.get("random_weights", False)),
        "num_images": num_images, "eval": {k: v for k, v in dataclasses.asdict(eval_config).items()
                                           if k in ("seed", "cfg", "top_k", "top_p", "dtype", "num_real")},
        "classifier": ({"path": res.classifier.source, **res.classifier.info} if res.classifier else None),
        "eval_notes": fp_results.get("notes", []), "presets": list(presets), "methods": list(methods),
        "overrides": {k: str(v) for k, v in dict(overrides).items()}, "command": command, **environment(),
        "rows": rows, "diagnostics": diag, "wall_s": round(time.perf_counter() - started, 1),
    }
    result["findings"] = findings(rows, diag)
    write(out, result)
    log(f"wrote {out} and {os.path.splitext(out)[0]}.json")
    return result


# --- tables made in parts ---------------------------------------------------------------------------------------
SHARED = ("model", "checkpoint", "random_weights", "num_images", "eval", "classifier", "overrides")
PART_FIELDS = ("command", "device", "host", "date", "jax", "wall_s")


def _row_order(row: dict) -> tuple:
    """Higher bit widths first (as the CLI's default preset list), methods in METHODS order."""
    return (-row["w_bits"], -row["a_bits"], METHODS.index(row["method"]) if row["method"] in METHODS else len(METHODS))


def merge(parts: Sequence[dict], *, ck=None, workdir: str = "", diag_samples: int = 0, command: str = "",
          log: Callable = print) -> dict:
    """One table from ablation results of separate invocations on the same model and evaluation settings (e.g.
    one per GPU, each with its own presets/methods): rows in preset × method order with the FP row once, the
    frequency-mismatch diagnostics joined, and the A·V diagnostic recomputed here on `ck` (the parts' model)
    when `diag_samples` > 0, else joined from the parts. Mismatched parts are a ValueError, before any work."""
    if not parts:
        raise ValueError("nothing to merge: give at least one ablation result")
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        diff = [k for k in SHARED if p.get(k) != first.get(k)]
        if diff:
            raise ValueError(f"part {i} ({p.get('command')!r}) differs from part 0 in {', '.join(diff)}: "
                             f"only tables of the same model and evaluation settings can be merged")
    fp_rows = [next((r for r in p["rows"] if r["name"] == "fp"), None) for p in parts]
    if any(r is None for r in fp_rows):
        raise ValueError("every part must hold the FP row")
    same = lambda r: {k: v for k, v in r.items() if k != "eval_s"}
    if any(same(r) != same(fp_rows[0]) for r in fp_rows[1:]):
        raise ValueError("the parts' FP rows differ: they were evaluated separately (share one --workdir so the "
                         "FP samples, the reference of 'FD to FP', are the same)")
    rows, seen = [], set()
    for p in parts:
        for r in p["rows"]:
            if r["name"] == "fp":
                continue
            if r["name"] in seen:
                raise ValueError(f"run {r['name']} appears in more than one part")
            seen.add(r["name"])
            rows.append(r)
    q = sorted(rows, key=_row_order)
    rows = [fp_rows[0]] + q
    presets = list(dict.fromkeys(r["preset"] for r in q))
    methods = sorted({r["method"] for r in q}, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    order = {r["name"]: i for i, r in enumerate(rows)}
    fms = {fm["run"]: fm for p in parts for fm in p["diagnostics"]["frequency_mismatch"]}
    av = {}
    for p in parts:
        for d in p["diagnostics"]["av_error"]:
            av.setdefault(d["a_bits"], d)
    diag = {"av_error": [av[b] for b in sorted(av, reverse=True)],
            "frequency_mismatch": sorted(fms.values(), key=lambda fm: order.get(fm["run"], len(order)))}
    if diag_samples > 0:
        if ck is None:
            raise ValueError("recomputing the A·V diagnostic needs the parts' model (ck)")
        if default_model.describe(ck) != first["model"]:
            raise ValueError(f"the given model ({default_model.describe(ck)}) is not the parts' model "
                             f"({first['model']})")
        runs = [r for r in plan(presets, methods, first["overrides"]) if r.name in seen]
        reports = {r["name"]: {"theta": r["theta"]} for r in q}
        diag["av_error"] = run_diagnostics(ck, runs, reports, workdir, diag_samples, log)["av_error"]
    result = {k: first[k] for k in SHARED}
    result.update(eval_notes=first.get("eval_notes", []), presets=presets, methods=methods, command=command,
                  **environment(), rows=rows, diagnostics=diag,
                  wall_s=max(p.get("wall_s", 0.0) for p in parts),
                  parts=[{k: p.get(k) for k in PART_FIELDS} for p in parts],
                  av_error_from="this merge" if diag_samples > 0 else "the parts")
    result["findings"] = findings(rows, diag)
    return result


def write(out: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for path, text in ((out, to_markdown(result)),
                       (os.path.splitext(out)[0] + ".json", json.dumps(result, indent=1, default=float))):
        with open(path + ".partial", "w") as f:
            f.write(text)
        os.replace(path + ".partial", path)


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
