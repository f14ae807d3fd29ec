"""The ablation table: PTQ presets × methods on one FP checkpoint, evaluated alike, in one markdown table.

`run_ablation` quantizes the model once per (preset, method) with `runs.quantize.quantize_command` (each run in its own
directory under `workdir`, skipped when its outputs exist, resumed when they are partial), evaluates the FP model
and every quantized checkpoint with `evaluate.evaluate` on the same labels and keys (the FP samples are the
reference of the "FD to FP" column), adds the two diagnostics of `diagnostics`, and writes `out` (markdown) and
the same numbers as JSON beside it. Every name, override and setting is checked before any work.

Layout of `workdir`: fp/eval/, <preset>_<method>/ptq/ (model/, report.json, state/), <preset>_<method>/eval/;
<run>/ptq_config.json is the run's PTQ config (a rerun with another config is refused: the PTQ stages resume from
disk), <run>/eval_time.json its evaluation wall time (so a skipped run still reports it).
"""
import dataclasses
import datetime
import json
import os
import socket
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np

from varq_jax import default_model, fingerprint, parallel
from varq_jax.files import atomic_write
from varq_jax.eval import evaluate as ev
from varq_jax.eval import metrics, paired
from varq_jax.quant import calibration, diagnostics, pipeline, state, theta as theta_lib
from varq_jax.checkpoint import read_state
from varq_jax.runs import ptq as ptq_run, quantize as quantize_run
from varq_jax.runs import protocol as protocol_lib
from varq_jax.runs import stopping, zero_shot_rows
from varq_jax.runs.protocol import NOISE_ROW, Protocol
from varq_jax.runs.results_table import diagnostic_findings, write

SAS_METHODS = ("full", "brecq_sas")                 # runs whose θ the A·V diagnostic uses, in this order
EVAL_TIME = "eval_time.json"
PTQ_CONFIG = "ptq_config.json"
@dataclasses.dataclass
class Run:
    preset: str
    method: str
    config: Any                                    # the PTQ ConfigDict, overrides applied
    calib_seed: Optional[int] = None               # set by the protocol (None: the config's own)
    first_calib_seed: Optional[int] = None

    @property
    def name(self) -> str:
        base = f"{self.preset}_{self.method}"
        if self.calib_seed is None or self.first_calib_seed in (None, self.calib_seed):
            return base
        return f"{base}_c{self.calib_seed}"


@dataclasses.dataclass
class Plan:
    """The runs of a table (preset-major) as the CLI layer made them from preset names (`varq_jax.cli.
    ablation_plan`), with the names and overrides they came from (recorded in the result)."""
    runs: List[Run]
    presets: List[str]
    methods: List[str]                            # in table order
    overrides: Dict[str, Any] = dataclasses.field(default_factory=dict)


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
def _ptq(run: Run, checkpoint: Optional[str], run_dir: str, log: Callable, calibration: Optional[str] = None) -> dict:
    ptq_dir = os.path.join(run_dir, "ptq")
    report_path = os.path.join(ptq_dir, "report.json")
    if os.path.exists(report_path) and os.path.isdir(os.path.join(ptq_dir, "model")):
        log(f"[{run.name}] PTQ outputs exist: skipped")
        return json.load(open(report_path))
    log(f"[{run.name}] PTQ ...")
    os.makedirs(run_dir, exist_ok=True)
    # before any work: a resumed run must match it
    atomic_write(os.path.join(run_dir, PTQ_CONFIG), json.dumps(_json_config(run.config), indent=1))
    quantize_run.quantize_command(run.config, checkpoint, ptq_dir, log=log, calibration=calibration)
    return json.load(open(report_path))        # what was written (JSON types), as a skipped run would read it


def _eval_reusable(results: dict, config: ev.EvalConfig, num_images: int, vocab_size: int,
                   execution: str) -> bool:
    s = results.get("samples", {})
    settings = json.loads(json.dumps(dataclasses.asdict(config.sampling_config(vocab_size))))
    return (s.get("num_images") == num_images and s.get("seed") == config.seed and s.get("dtype") == config.dtype
            and s.get("execution", "simulate") == execution
            and s.get("sampling") == settings and results.get("metrics")
            and results.get("references", {}).get("ref_samples") == config.ref_samples)


def _evaluate(checkpoint: Optional[str], run_dir: str, config: ev.EvalConfig, res: ev.Resources, num_images: int,
              vocab_size: int, mesh, log: Callable, model=None, name: str = "eval"):
    """results.json of the run's evaluation in run_dir/name (reused when it matches the settings) and its wall
    time."""
    out_dir = os.path.join(run_dir, name)
    results_path, time_path = os.path.join(out_dir, ev.RESULTS), os.path.join(out_dir, EVAL_TIME)
    per_image = os.path.join(out_dir, ev.PER_IMAGE)
    if os.path.exists(results_path) and os.path.exists(time_path) and (res.classifier is None
                                                                       or os.path.exists(per_image)):
        results = json.load(open(results_path))
        execution = "simulate" if model is not None and model.policy is None else config.execution   # FP: float
        if _eval_reusable(results, config, num_images, vocab_size, execution):
            log(f"[{os.path.basename(run_dir)}/{name}] evaluation outputs exist: skipped")
            return results, json.load(open(time_path))["seconds"]
    t = time.perf_counter()
    ev.evaluate(checkpoint, out_dir, config, mesh=mesh, resources=res, model=model, log=log)
    seconds = round(time.perf_counter() - t, 3)
    atomic_write(time_path, json.dumps({"seconds": seconds}))
    return json.load(open(results_path)), seconds


def _row(name: str, preset: str, method: str, results: Sequence[dict], eval_s: float, report: Optional[dict],
         w_bits=None, a_bits=None, bops=None, calib_seed=None) -> dict:
    """A table row from its per-seed evaluations (metrics: their mean until the bootstrap sets the pooled ones)."""
    def mean(key):
        v = [r.get("metrics", {}).get(key) for r in results]
        return None if any(x is None for x in v) else float(np.mean(v))
    row = {"name": name, "preset": preset, "method": method, "w_bits": w_bits, "a_bits": a_bits,
           "calib_seed": calib_seed, "class_accuracy": mean("class_accuracy"), "fd_real": mean("fd_classifier_real"),
           "fd_fp": mean("fd_classifier_vs_ref_samples"), "eval_s": eval_s,
           "num_images": sum(r["samples"]["num_images"] for r in results), "intervals": {}}
    if report is not None:
        row.update(bops_quantized=report["bops"]["quantized"], bops_with_sas=report["bops"]["quantized_with_sas"],
                   theta=report.get("theta"), ptq_s=report["stages"]["total"],
                   calibration=report.get("fingerprints", {}).get("calibration"))
    else:
        row.update(bops_quantized=bops, bops_with_sas=None, theta=None, ptq_s=None, calibration=None)
    return row


# --- diagnostics --------------------------------------------------------------------------------------------------
def _calibration_tokens(ck, runs: Sequence[Run], workdir: str, num: int):
    """The first `num` calibration token maps (as sampled, before any resampling) of the first run that kept its
    calibration set, else freshly generated alike."""
    for r in runs:
        stage_dir = os.path.join(workdir, r.name, "ptq", "state", ptq_run.CALIBRATION)
        if os.path.isdir(stage_dir):
            arrays, _ = read_state(stage_dir)
            n = min(num, len(arrays["labels"]))
            return np.asarray(arrays["labels"][:n]), [np.asarray(t[:n]) for t in arrays["tokens"]], r.name
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


def protocol_runs(plan: Plan, protocol: Protocol) -> List[Run]:
    """The plan's runs on every calibration seed the protocol gives their preset, each config set to make (or
    share) that seed's calibration set in the protocol's dtype. No PTQ comparison grid: each row's evaluation keeps
    its own (eval_s*/grid.png), and the grid costs two more sampler compilations per row."""
    runs = []
    for r in plan.runs:
        for cs in protocol.calib_seeds_of(r.preset):
            config = r.config.copy_and_resolve_references()
            config.calib.seed, config.calib.dtype = cs, protocol.calib_dtype
            config.samples.num = 0
            runs.append(dataclasses.replace(r, config=config, calib_seed=cs,
                                            first_calib_seed=protocol.calib_seeds[0]))
    return runs


def _evaluate_seeds(checkpoint, run_dir, config, res, protocol: Protocol, seeds, vocab, mesh, log, model=None,
                    ref_dirs=None):
    """The row's sets, one per seed (run_dir/eval_s<seed>): (per-image data pooled in seed order, results per
    seed, seconds)."""
    per_image, results, seconds = [], [], 0.0
    for i, seed in enumerate(seeds):
        c = dataclasses.replace(config, seed=seed, num_images=protocol.images_per_seed,
                                ref_samples=None if ref_dirs is None else os.path.join(ref_dirs[i], "samples.npz"))
        res.ref_samples = None if c.ref_samples is None else metrics.load_reference_batch(c.ref_samples)
        out, t = _evaluate(checkpoint, run_dir, c, res, protocol.images_per_seed, vocab, mesh, log, model=model,
                           name=f"eval_s{seed}")
        results.append(out)
        seconds += t
        if res.classifier is not None:
            per_image.append(ev.load_per_image(os.path.join(run_dir, f"eval_s{seed}", ev.PER_IMAGE)))
    return per_image, results, round(seconds, 3)


def _real_features(res: ev.Resources, eval_config: ev.EvalConfig, protocol: Protocol, image_size: int, mesh):
    dataset = res.classifier.info["dataset"]
    n = eval_config.num_real or protocol.num_images
    return res.features(res.classifier, (f"{dataset}-test", n, image_size),
                        ev._real_images(dataset, n, image_size), mesh, eval_config.feature_batch)["features"]


def _given_calibration(paths: Sequence[str], ck, runs: Sequence[Run], protocol: Protocol) -> Dict[int, str]:
    """{calibration seed: stage directory} of the sets in `paths`, checked before any work: made from this model,
    on a seed some run uses, in the protocol's dtype, with the runs' calibration settings, one set per seed."""
    model_id = fingerprint.model_digest(ck)
    seeds = sorted({r.calib_seed for r in runs})
    given = {}
    for path in paths:
        source = ptq_run.calibration_path(path)
        record = ptq_run.load_calibration(source, model_id)[1]["fingerprint"]
        seed = record.get("calib.seed")
        if seed not in seeds:
            raise ValueError(f"the calibration set {path!r} has seed {seed}; the runs of this table use "
                             f"{', '.join(map(str, seeds))}")
        if seed in given:
            raise ValueError(f"two calibration sets of seed {seed} given: {given[seed]!r} and {source!r}")
        if protocol.calib_dtype != "auto" and record.get("calib.dtype") != protocol.calib_dtype:
            raise ValueError(f"the calibration set {path!r} was sampled in {record.get('calib.dtype')}, the "
                             f"protocol's sets in {protocol.calib_dtype}")
        for r in (r for r in runs if r.calib_seed == seed):
            calib = pipeline.from_config(r.config, ck.var_cfg)[1].calib
            wrong = [f.name for f in dataclasses.fields(calib)
                     if f.name != "dtype" and record.get(f"calib.{f.name}") != getattr(calib, f.name)]
            if wrong:
                raise ValueError(f"the calibration set {path!r} does not fit run {r.name}: calib.{wrong[0]} is "
                                 f"{record.get('calib.' + wrong[0])!r} there, {getattr(calib, wrong[0])!r} here")
        given[seed] = source
    return given


def run_ablation(plan: Plan, eval_config: ev.EvalConfig, workdir: str, out: str, *,
                 checkpoint: Optional[str] = None, diag_samples: int = 8, command: str = "",
                 protocol: Protocol = Protocol(), zero_shot: Sequence[str] = (), calibration: Sequence[str] = (),
                 only: Sequence[str] = (), stop_on: Sequence[int] = (), log: Callable = print) -> dict:
    """The FP model and every run of `plan` under `protocol`: PTQ on shared calibration sets, evaluation over the
    protocol's seeds, bootstrap intervals, diagnostics; the zero-shot tasks for FP and the runs named in
    `zero_shot` (`runs.zero_shot_rows`); writes `out` (markdown), its .json twin and the bootstrap values
    (.replicates.npz). `calibration`: calibration sets of earlier invocations (e.g. another part of the table, run
    on another machine), shared by the runs of their seeds instead of sampling them again. `only`: run just these
    runs of the table (e.g. one row on a second calibration seed), a part for `merge`. `stop_on`: signals (e.g.
    SIGTERM; main thread only) after which the table of the runs finished so far is written, the others listed as
    not run (the same call again resumes); one during the FP rows raises `stopping.Stopped`. Returns what the JSON
    holds."""
    if eval_config.ref_samples:
        raise ValueError("the ablation sets ref_samples itself (the FP model's samples); leave it empty")
    if eval_config.dtype not in ev.DTYPES:
        raise ValueError(f"dtype must be one of {sorted(ev.DTYPES)}, got {eval_config.dtype!r}")
    if diag_samples < 0:
        raise ValueError(f"diag_samples must be >= 0, got {diag_samples}")
    if not out.endswith(".md"):
        raise ValueError(f"out must be a markdown file (.md), got {out!r}")
    checkpoint = default_model.resolve(checkpoint)
    if checkpoint is not None and not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint directory {checkpoint!r} does not exist")
    ck = default_model.load_model(checkpoint)
    if ck.policy is not None:
        raise ValueError(f"{checkpoint} is a quantized checkpoint; the ablation starts from a full-precision one")
    runs = protocol_runs(plan, protocol)
    unknown = sorted(set(only) - {r.name for r in runs})
    if unknown:
        raise ValueError(f"run {unknown[0]!r} is not a run of this table; its runs: {', '.join(r.name for r in runs)}")
    runs = [r for r in runs if not only or r.name in only]
    check_runs(runs, ck.var_cfg, workdir)
    given = _given_calibration(calibration, ck, runs, protocol)
    unknown = sorted(set(zero_shot) - {r.name for r in runs})
    if unknown:
        raise ValueError(f"zero-shot rows {', '.join(unknown)} are not runs of this table; its runs: "
                         f"{', '.join(r.name for r in runs)}")
    res = ev.load_resources(eval_config, ck.vae_cfg.image_size, ck.var_cfg.num_classes)
    if zero_shot and res.classifier is None:
        raise ValueError("zero-shot rows need a classifier (their FD and class accuracy): none fits this model")
    zs_config = dataclasses.replace(eval_config, seed=protocol.seeds[0], num_images=0)
    zs_inputs = (zero_shot_rows.make_inputs(res.classifier.info["dataset"], protocol.zero_shot_images, ck, zs_config)
                 if zero_shot else None)
    mesh = parallel.make_mesh(eval_config.model_parallel)
    started = time.perf_counter()

    with stopping.ignoring(stop_on):             # from the first stop signal on: write what finished
        done = _run_rows(runs, checkpoint, ck, workdir, eval_config, res, protocol, zero_shot, zs_inputs, zs_config,
                         given, mesh, stop_on, log)
        rows, sets, reports, values, stopped, notes, zs = (done[k] for k in (
            "rows", "sets", "reports", "values", "stopped", "eval_notes", "zero_shot"))
        finished = [r for r in runs if r.name in reports]
        if res.classifier is not None:
            log(f"[bootstrap] {protocol.replicates} paired replicates over {protocol.num_images} images ...")
            pooled = {name: protocol_lib.pooled(p) for name, p in sets.items()}
            protocol_lib.check_paired(pooled, {name: np.concatenate([x["labels"] for x in p])
                                               for name, p in sets.items()})
            values.update(protocol_lib.bootstrap(pooled, _real_features(res, eval_config, protocol,
                                                                        ck.vae_cfg.image_size, mesh), "fp", protocol))
            for row in rows:
                _set_estimates(row, values.get(row["name"], {}))
        result = _result(ck, checkpoint, plan, eval_config, protocol, res, rows, notes, command, started,
                         run_diagnostics(ck, finished, reports, workdir, diag_samples, log))
        if zs is not None:
            result["zero_shot"] = zs
        if stopped:
            result["stopped"] = stopped
            result["not_run"] = [r.name for r in runs if r.name not in reports]
            result["zero_shot_not_run"] = list(dict.fromkeys(zero_shot))
        _conclude(result, values, protocol)
        write(out, result)
        log(f"wrote {out} and {os.path.splitext(out)[0]}.json" + (f" (stopped by {stopped}: the runs finished "
                                                                   f"before it)" if stopped else ""))
    return result


def _run_rows(runs, checkpoint, ck, workdir, eval_config, res, protocol, zero_shot, zs_inputs, zs_config, given,
              mesh, stop_on, log):
    """The FP rows, then PTQ and evaluation of each run, then the zero-shot rows: {rows, sets (per-row images),
    reports (of the finished runs), zero_shot (the section, or None), values (its bootstrap values), eval_notes,
    stopped (the stop signal's name, or None)}. A stop signal ends the runs at the one it arrives in (that one,
    the rest and the zero-shot rows are left out)."""
    vocab = ck.var_cfg.vocab_size
    fp_dir = os.path.join(workdir, "fp")
    fp_dirs = [os.path.join(fp_dir, f"eval_s{s}") for s in protocol.seeds]
    rows, sets, reports, zs, values, notes = [], {}, {}, None, {}, []
    try:
        with stopping.raising(stop_on):
            log("[fp] evaluation ...")
            fp_images, fp_results, fp_s = _evaluate_seeds(checkpoint, fp_dir, eval_config, res, protocol,
                                                          protocol.seeds, vocab, mesh, log, model=ck)
            fp_bops = pipeline.bops_report(ck.var_cfg, None)["fp16"]
            rows.append(_row("fp", "fp", "–", fp_results, fp_s, None, bops=fp_bops))
            notes = fp_results[0].get("notes", [])
            sets["fp"] = fp_images
            if protocol.noise_seeds:
                noise_images, noise_results, noise_s = _evaluate_seeds(checkpoint, fp_dir, eval_config, res, protocol,
                                                                       protocol.noise_seeds, vocab, mesh, log,
                                                                       model=ck)
                rows.append(_row(NOISE_ROW, "fp", "other seeds", noise_results, noise_s, None, bops=fp_bops))
                sets[NOISE_ROW] = noise_images
            shared = dict(given)
            for i, r in enumerate(runs):
                log(f"=== {i + 1}/{len(runs)}: {r.name} (calibration seed {r.calib_seed}) ===")
                run_dir = os.path.join(workdir, r.name)
                report = _ptq(r, checkpoint, run_dir, log, calibration=shared.get(r.calib_seed))
                shared.setdefault(r.calib_seed, os.path.join(run_dir, "ptq"))
                images, results, eval_s = _evaluate_seeds(os.path.join(run_dir, "ptq", "model"), run_dir,
                                                          eval_config, res, protocol, protocol.seeds, vocab, mesh,
                                                          log, ref_dirs=fp_dirs)
                rows.append(_row(r.name, r.preset, r.method, results, eval_s, report, r.config.w_bits,
                                 r.config.a_bits, calib_seed=r.calib_seed))
                sets[r.name] = images
                reports[r.name] = report                   # last: a run is finished once its report is here
            if zero_shot:
                chosen = [(next(r for r in rows if r["name"] == name), os.path.join(workdir, name),
                           os.path.join(workdir, name, "ptq", "model")) for name in dict.fromkeys(zero_shot)]
                zs_rows, zs_values = zero_shot_rows.run_rows(ck, fp_dir, chosen, zs_inputs, zs_config, res, mesh,
                                                             protocol, log)
                values.update(zs_values)
                zs = {"rows": zs_rows, "num_inputs": protocol.zero_shot_images, "box": list(zs_config.box),
                      "seed": zs_config.seed, "tasks": list(zs_config.tasks)}
    except stopping.Stopped as e:
        kept = ({"fp", NOISE_ROW} & set(sets)) | set(reports)        # a signal can fall between two of the updates
        rows, sets = [r for r in rows if r["name"] in kept], {k: v for k, v in sets.items() if k in kept}
        if (NOISE_ROW if protocol.noise_seeds else "fp") not in {r["name"] for r in rows}:
            raise stopping.Stopped(f"{e} during the FP rows: nothing to write") from None
        log(f"[stopped] {e}: writing the table of the runs finished before it")
        return dict(rows=rows, sets=sets, reports=reports, zero_shot=None, values={}, eval_notes=notes,
                    stopped=str(e))
    return dict(rows=rows, sets=sets, reports=reports, zero_shot=zs, values=values, eval_notes=notes, stopped=None)


def _result(ck, checkpoint, plan, eval_config, protocol, res, rows, notes, command, started, diag) -> dict:
    return {
        "model": default_model.describe(ck), "checkpoint": checkpoint or "default (embedded)",
        "random_weights": bool(ck.meta.get("random_weights", False)),
        "num_images": protocol.num_images, "protocol": protocol.to_dict(),
        "eval": {k: v for k, v in dataclasses.asdict(eval_config).items()
                 if k in ("cfg", "top_k", "top_p", "dtype", "num_real", "execution")},
        "classifier": ({"path": res.classifier.source, **res.classifier.info} if res.classifier else None),
        "eval_notes": notes, "presets": list(plan.presets), "methods": list(plan.methods),
        "overrides": {k: str(v) for k, v in dict(plan.overrides).items()}, "command": command, **environment(),
        "rows": rows, "diagnostics": diag, "wall_s": round(time.perf_counter() - started, 1),
    }
def _set_estimates(row: dict, values: Mapping) -> None:
    """The row's metrics on the pooled images with their intervals (replacing the per-seed evaluations' own)."""
    for metric in ("class_accuracy", "fd_real", "fd_fp"):
        if metric in values:
            row[metric] = float(values[metric][0])
    row["intervals"] = protocol_lib.row_intervals(values)


def _conclude(result: dict, values: Mapping, protocol: Protocol) -> None:
    result["_values"] = values          # the bootstrap values: written beside the table, not into its JSON
    result["comparisons"] = protocol_lib.comparisons(result["rows"], values) if values else []
    if result.get("zero_shot"):
        zero_shot_rows.set_intervals(result["zero_shot"]["rows"], values)
        result["zero_shot"]["comparisons"] = zero_shot_rows.comparisons(result["zero_shot"]["rows"], values)
    result["calibration_comparisons"] = protocol_lib.calibration_comparisons(result["rows"], values) if values else []
    result["findings"] = (protocol_lib.findings(result["rows"], result["comparisons"], protocol)
                          + protocol_lib.calibration_findings(result["rows"], result["calibration_comparisons"])
                          + diagnostic_findings(result["diagnostics"]))


# --- tables made in parts ---------------------------------------------------------------------------------------
SHARED = ("model", "checkpoint", "random_weights", "num_images", "protocol", "eval", "classifier", "overrides")
PART_FIELDS = ("command", "device", "host", "date", "jax", "wall_s", "stopped")


FP_TOLERANCE = 0.1      # of the noise floor: how far apart the parts' FP rows may be (see _fp_agreement)
FP_METRICS = ("class_accuracy", "fd_real", "fd_fp")


def _fp_agreement(fp_rows: Sequence[Sequence[dict]], first: int = 0) -> Optional[str]:
    """None when the parts' FP rows are equal (one device session: the same samples bit for bit). Parts made on
    separate GPU sessions sample the same keys and labels, but autotuned kernels round differently, so their FP
    rows differ slightly; they are merged when every FP metric is within FP_TOLERANCE of the noise floor's distance
    (part 0's FP row against its other-seeds row; 'FD to FP' against the noise row's own), with part 0's FP rows
    the table's and each part's 'FD to FP' against its own FP set — said in the returned note."""
    same = lambda rs: [{k: v for k, v in r.items() if k != "eval_s"} for r in rs]
    if all(same(rs) == same(fp_rows[0]) for rs in fp_rows[1:]):
        return None
    refused = ValueError("the parts' FP rows differ: they were not sampled alike (same model, protocol and "
                         "device, so that the FP samples, the reference of 'FD to FP', are the same)")
    by_name = [{r["name"]: r for r in rs} for rs in fp_rows]
    if any(set(b) != set(by_name[0]) for b in by_name[1:]) or NOISE_ROW not in by_name[0]:
        raise refused
    fp, noise = by_name[0]["fp"], by_name[0][NOISE_ROW]
    floor = {"class_accuracy": abs(noise["class_accuracy"] - fp["class_accuracy"]),
             "fd_real": abs(noise["fd_real"] - fp["fd_real"]), "fd_fp": noise["fd_fp"]}
    worst = {m: 0.0 for m in FP_METRICS}
    for b in by_name[1:]:
        for name, r in b.items():
            for m in FP_METRICS:
                x, x0 = r.get(m), by_name[0][name].get(m)
                if (x is None) != (x0 is None):
                    raise refused
                if x is not None:
                    worst[m] = max(worst[m], abs(x - x0))
    over = [m for m in FP_METRICS if worst[m] > FP_TOLERANCE * floor[m]]
    if over:
        raise ValueError(f"{refused} — {over[0]} differs by {worst[over[0]]:.4g}, more than {FP_TOLERANCE} of the "
                         f"noise floor's {floor[over[0]]:.4g}")
    return (f"the parts' FP sets were sampled or scored in separate invocations (same keys and labels): their FP "
            f"rows differ by at most {worst['class_accuracy']:.4g} in class accuracy, {worst['fd_real']:.4g} in FD "
            f"to real and {worst['fd_fp']:.4g} in FD to FP (≤ {FP_TOLERANCE} of the noise floor's distance); the FP "
            f"rows are part {first}'s, and each part's 'FD to FP' is against its own FP set")


def _fp_sets(fp_rows: Sequence[Sequence[dict]], separate: bool, devices: Sequence[str]) -> tuple:
    """(FP set of each part, notes). A part joins the first set whose first part's FP rows it matches (exactly, or
    within FP_TOLERANCE of the noise floor: `_fp_agreement`); one that matches none is refused, or, with
    `separate`, starts a set of its own — parts sampled on another kind of GPU (an H100 beside H200 parts) sample
    the same keys into other images often enough that pairing them with another set's images would be false."""
    firsts, set_of = [], []
    for i, rs in enumerate(fp_rows):
        refusal = None
        for k, j in enumerate(firsts):
            try:
                _fp_agreement([fp_rows[j], rs])
                set_of.append(k)
                break
            except ValueError as e:
                refusal = e
        else:
            if refusal is not None and not separate:
                raise ValueError(f"{refusal} (merge them as separate FP sets, each set's rows compared only within "
                                 f"it: --fp_sets)")
            firsts.append(i)
            set_of.append(len(firsts) - 1)
    members = [[i for i, s in enumerate(set_of) if s == k] for k in range(len(firsts))]
    notes = []
    for k, m in enumerate(members):
        note = _fp_agreement([fp_rows[i] for i in m], first=m[0])
        if note:
            notes.append(note if len(firsts) == 1 else f"FP set {k + 1}: {note}")
    if len(firsts) > 1:
        sets = "; ".join(f"FP set {k + 1}: part{'s' if len(m) > 1 else ''} {', '.join(map(str, m))} "
                         f"({', '.join(sorted({devices[i] for i in m}))})" for k, m in enumerate(members))
        notes.insert(0, f"the parts' FP rows differ beyond {FP_TOLERANCE} of the noise floor, so they form "
                        f"{len(firsts)} FP sets ({sets}): the same keys sampled into partly other images. Each set "
                        f"has its own FP and noise-floor rows, a row's 'FD to FP' is against its own set's FP samples, "
                        f"and every stated difference lies within one set (rows of different sets are not paired "
                        f"image by image, so they are not compared)")
    return set_of, notes


def _requantized_note(name: str, row: dict, i: int, other: dict, j: int, va: Mapping, vb: Mapping,
                      other_set: Optional[int] = None) -> str:
    """A run quantized again in a later part: for its zero-shot rows (the table keeps the first part's row), or in
    another FP set (a row of that set). With both parts' replicates, the note gives the paired difference: what
    quantizing and sampling the run again in another device session moves, a spread the bootstrap over images
    does not hold."""
    diff = ", ".join(f"{m} {row[m]:.4g} vs {other[m]:.4g}" for m in FP_METRICS
                     if row.get(m) is not None and other.get(m) is not None)
    paired_ = [(m, paired.difference_of(*va[m], *vb[m])) for m in FP_METRICS
               if m in va and m in vb and len(va[m][1]) and len(vb[m][1])]
    again = (f"; part {j} − part {i}, paired: "
             + ", ".join(f"{m} {d.estimate:+.4g} [{d.low:+.4g}, {d.high:+.4g}]" for m, d in paired_)
             if paired_ else "")
    if other_set is not None:
        return (f"run {name}: quantized again by part {j} in FP set {other_set + 1} (same calibration set and "
                f"settings), its row there {protocol_lib.in_fp_set(name, other_set)} ({diff}, part {i}'s "
                f"first{again}; two FP sets' images are not fully paired, so this difference holds the GPU's as "
                f"well as the re-run's)")
    return (f"run {name}: the table's row is part {i}'s; part {j} quantized it again for its zero-shot rows "
            f"(same calibration set and settings; its own row there: {diff}, part {i}'s first{again})")


def merge(parts: Sequence[dict], *, values: Sequence[Mapping] = (), ck=None, workdir: str = "", diag_samples: int = 0,
          command: str = "", method_order: Sequence[str] = (), make_plan: Optional[Callable] = None,
          planned: Sequence[str] = (), planned_zero_shot: Sequence[str] = (), fp_sets: bool = False,
          log: Callable = print) -> dict:
    """One table from ablation results of separate invocations on the same model and evaluation settings (e.g.
    one per GPU, each with its own presets/methods): rows with higher bit widths first, methods in `method_order`
    (else as the parts list them), the FP row once, the frequency-mismatch diagnostics joined, and the A·V
    diagnostic recomputed here on `ck` (the parts' model) when `diag_samples` > 0 — `make_plan(presets, methods,
    overrides)` gives the runs' configs — else joined from the parts. Mismatched parts are a ValueError, before
    any work. `values`: each part's bootstrap values (its .replicates.npz), joined so that the comparisons and
    their Holm adjustment are made over the whole table. The parts' protocols may differ only in `extra_calib`
    (which runs exist; the table's is their union) and `zero_shot_images` (the parts with zero-shot rows must
    agree). `planned`: run names of the whole table, those absent listed as not run (`planned_zero_shot` likewise
    for the runs of the zero-shot rows). A run may be in more than one part only where a later part quantized it
    again for its zero-shot rows (they need the model in their part); its row and values are then the first
    part's, with a note. Parts whose FP rows differ beyond the tolerance are refused, or with `fp_sets` form FP
    sets of their own (`_fp_sets`): each set's FP rows are rows of the table ('fp@2', …), its rows carry `fp_set`,
    a run of an earlier set quantized again there is a row of its own ('NAME@2'), and comparisons stay within a
    set."""
    order_of = list(method_order) or list(dict.fromkeys(m for p in parts for m in p.get("methods", [])))
    rank = lambda m: order_of.index(m) if m in order_of else len(order_of)
    if not parts:
        raise ValueError("nothing to merge: give at least one ablation result")
    first = parts[0]
    old = [i for i, p in enumerate(parts) if "protocol" not in p]
    if old:
        raise ValueError(f"part {old[0]} ({parts[old[0]].get('command')!r}) was made before the evaluation protocol "
                         f"(no seeds, no intervals): run it again with this version")
    settings = lambda p: {**p, "protocol": {k: v for k, v in p["protocol"].items()    # checked apart
                                            if k not in ("extra_calib", "zero_shot_images")},
                          "eval": {"execution": "simulate", **p["eval"]}}   # parts before it simulated
    for i, p in enumerate(parts[1:], 1):
        diff = [k for k in SHARED if settings(p).get(k) != settings(first).get(k)]
        if diff:
            raise ValueError(f"part {i} ({p.get('command')!r}) differs from part 0 in {', '.join(diff)}: "
                             f"only tables of the same model and evaluation settings can be merged")
    fp_rows = [[r for r in p["rows"] if r["preset"] == "fp"] for p in parts]
    if any(not any(r["name"] == "fp" for r in rs) for rs in fp_rows):
        raise ValueError("every part must hold the FP row")
    set_of, fp_notes = _fp_sets(fp_rows, fp_sets, [p.get("device", "?") for p in parts])
    several = len(set(set_of)) > 1
    tag = (lambda r, k: dict(r, fp_set=k)) if several else (lambda r, k: r)
    if values and len(values) != len(parts):
        raise ValueError(f"{len(parts)} parts but {len(values)} sets of bootstrap values")
    rows, seen, again = [], {}, []             # seen: (run, FP set) → (part, index in rows)
    table_name: Dict[tuple, str] = {}         # (part, its name of a row) → the table's name
    for i, p in enumerate(parts):
        k = set_of[i]
        zs_runs = {r["name"] for r in (p.get("zero_shot") or {}).get("rows", [])}
        for r in p["rows"]:
            name = r["name"]
            if r["preset"] == "fp":
                table_name[i, name] = protocol_lib.in_fp_set(name, k)
                continue
            part_values = lambda j: values[j].get(name, {}) if values else {}
            if (name, k) in seen:
                if name not in zs_runs:
                    raise ValueError(f"run {name} appears in more than one part")
                j, at = seen[name, k]
                again.append(_requantized_note(name, rows[at], j, r, i, part_values(j), part_values(i)))
                table_name[i, name] = rows[at]["name"]
                continue
            earlier = [seen[n, s] for n, s in seen if n == name]
            if earlier:
                j, at = earlier[0]
                again.append(_requantized_note(name, rows[at], j, r, i, part_values(j), part_values(i), other_set=k))
            table_name[i, name] = protocol_lib.in_fp_set(name, k) if earlier else name
            seen[name, k] = (i, len(rows))
            rows.append(tag(dict(r, name=table_name[i, name]), k))
    owner = {rows[at]["name"]: j for j, at in seen.values()}
    seen_runs = {n for n, _ in seen}
    joined: Dict[str, Mapping] = {}
    for i, v in enumerate(values):
        for name, metrics_ in v.items():
            task, sep, row = name.rpartition(":") if name.startswith("zero_shot:") else ("", "", name)
            new = task + sep + table_name.get((i, row), row)     # every part holds its FP rows
            if new in joined and (row in ("fp", NOISE_ROW)):
                exact = not fp_notes and not sep                 # zero-shot FP rows: a note instead
                if exact and any(not np.array_equal(joined[new][m][1], metrics_[m][1]) for m in metrics_):
                    raise ValueError(f"the parts' bootstrap values of {name} differ: they used other replicate "
                                     f"indices or other FP images")
                continue                                          # each set's first part's FP values are its
            if owner.get(new, i) != i or new in joined:
                continue                                          # a run's values are those of its row's part
            joined[new] = metrics_
    q = sorted(rows, key=lambda r: (-r["w_bits"], -r["a_bits"], rank(r["method"]), r.get("calib_seed") or 0,
                                    r.get("fp_set", 0)))
    set_fp_rows = [tag(dict(r, name=table_name[i, r["name"]]), k) for k in sorted(set(set_of))
                   for i in [set_of.index(k)] for r in fp_rows[i]]
    rows = [dict(r) for r in set_fp_rows + q]
    for row in rows:                     # intervals by this version's rule, from the stored replicates
        if row["name"] in joined:
            _set_estimates(row, joined[row["name"]])
    extra: Dict[str, list] = {}
    for p in parts:
        for preset, seeds in dict(p["protocol"].get("extra_calib", {})).items():
            extra[preset] = sorted(set(extra.get(preset, [])) | set(seeds))
    shot_parts = [i for i, p in enumerate(parts) if p.get("zero_shot")]
    protocol = protocol_lib.from_dict({**first["protocol"], "extra_calib": extra,
                                       **({"zero_shot_images": parts[shot_parts[0]]["protocol"]
                                           .get("zero_shot_images")} if shot_parts else {})})
    presets = list(dict.fromkeys(r["preset"] for r in q))
    methods = sorted({r["method"] for r in q}, key=rank)
    order = {r["name"]: i for i, r in enumerate(rows)}
    fms = {}
    for i, p in enumerate(parts):
        for fm in p["diagnostics"]["frequency_mismatch"]:
            name = table_name.get((i, fm["run"]), fm["run"])
            fms.setdefault(name, dict(fm, run=name))
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
        if make_plan is None:
            raise ValueError("recomputing the A·V diagnostic needs the runs' configs (make_plan)")
        runs = [r for r in protocol_runs(make_plan(presets, methods, first["overrides"]), protocol)
                if r.name in seen_runs]
        reports = {r["name"]: {"theta": r["theta"]} for r in q}
        diag["av_error"] = run_diagnostics(ck, runs, reports, workdir, diag_samples, log)["av_error"]
    result = {k: first[k] for k in SHARED}
    result["protocol"] = protocol.to_dict()
    result["not_run"] = [name for name in planned if name not in seen_runs]
    result.update(eval_notes=first.get("eval_notes", []) + fp_notes + again,
                  presets=presets, methods=methods, command=command,
                  **environment(), rows=rows, diagnostics=diag,
                  wall_s=max(p.get("wall_s", 0.0) for p in parts),
                  parts=[{**{k: p.get(k) for k in PART_FIELDS}, **({"fp_set": set_of[i]} if several else {})}
                         for i, p in enumerate(parts)],
                  av_error_from="this merge" if diag_samples > 0 else "the parts")
    shots = [parts[i]["zero_shot"] for i in shot_parts]
    if shots:
        setting = lambda z: (z["num_inputs"], z["box"], z["seed"], z["tasks"])
        if any(setting(z) != setting(shots[0]) for z in shots[1:]):
            raise ValueError("the parts' zero-shot rows were made on other inputs or settings: they cannot be merged")
        zs_rows = {}
        for i in shot_parts:
            for r in parts[i]["zero_shot"]["rows"]:
                r = tag(dict(r, name=table_name.get((i, r["name"]), r["name"])), set_of[i])
                zs_rows.setdefault((r["task"], r["name"]), r)     # the FP rows as their values: each set's first
        notes = [n if not several else f"FP set {k + 1}: {n}" for k in sorted(set(set_of))
                 for n in zero_shot_rows.fp_agreement([z for i, z in zip(shot_parts, shots) if set_of[i] == k])]
        result["zero_shot"] = {**{k: shots[0][k] for k in ("num_inputs", "box", "seed", "tasks")},
                               "notes": notes,
                               "rows": sorted(zs_rows.values(), key=lambda r: (
                                   shots[0]["tasks"].index(r["task"]), r["preset"] != "fp",
                                   -(r["w_bits"] or 0), -(r["a_bits"] or 0), rank(r["method"]),
                                   r.get("calib_seed") or 0, r.get("fp_set", 0)))}
    zs_names = {r["name"] for i in shot_parts for r in parts[i]["zero_shot"]["rows"]}   # the runs' own names
    result["zero_shot_not_run"] = [n for n in planned_zero_shot if n not in zs_names]
    _conclude(result, joined, protocol)
    return result


