"""The evaluation protocol of an ablation table: paired, seeded, with bootstrap intervals (issue 18).

Every model is sampled on the same keys — seeds × images per seed, image i of seed s from fold_in(key(s), i) with
label i mod classes — so rows are paired image by image; the FP model is sampled again with other seeds (the noise
floor: how far apart two FP sets are). Each quantization method runs on the calibration set of its calibration
seed, made once in float32 at HIGHEST precision and shared by every row of that seed (its fingerprint in each row);
at low bits (`extra_calib`) methods run on further calibration seeds, so a method difference is seen on more than
one calibration set, and the same method on two sets is compared too (its own Holm family: what the calibration
data alone moves). Intervals are paired bootstrap intervals over image indices (`varq_jax.eval.paired`): the
same replicate indices for every row, Fréchet distances recomputed per replicate, the bootstrap's own bias
removed. A finding calls a difference only where its interval excludes zero after Holm's adjustment over every
comparison the table states.
"""
import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from varq_jax.eval import paired

# (what is compared, from method, to method): the comparisons a table states, within one preset and calib seed
COMPARISONS = (("reconstruction", "baseline", "brecq"),
               ("shift-and-sum", "brecq", "brecq_sas"),
               ("resampling", "brecq", "brecq_resample"),
               ("shift-and-sum on top of resampling", "brecq_resample", "full"),
               ("resampling on top of shift-and-sum", "brecq_sas", "full"),
               ("both", "brecq", "full"),
               ("LiteVAR's fc2 rule", "brecq", "litevar"),
               ("LiteVAR's fc2 rule on top of the method", "full", "full_litevar"),
               ("the method on top of LiteVAR", "litevar", "full_litevar"),
               ("fc2 at W8A8", "brecq", "litevar_w8"),
               ("fc2 at W8A8 on top of the method", "full", "full_litevar_w8"),
               ("the method on top of fc2 at W8A8", "litevar_w8", "full_litevar_w8"))
# (metric, title, lower is better)
METRICS = (("class_accuracy", "class accuracy", False), ("fd_real", "FD to real", True),
           ("fd_fp", "FD to FP", True))
NOISE_ROW = "fp_other_seeds"
RANGES = {"class_accuracy": (0.0, 1.0), "ssim_kept": (None, 1.0)}   # (floor, ceiling) of a row's interval; FDs ≥ 0


@dataclasses.dataclass(frozen=True)
class Protocol:
    seeds: Tuple[int, ...] = (0, 1, 2)               # sampling seeds of every model (images_per_seed each)
    images_per_seed: int = 1000
    noise_seeds: Tuple[int, ...] = (3, 4, 5)         # the FP model again: the noise-floor row (() = none)
    replicates: int = 2000                           # paired bootstrap replicates (0 = no intervals)
    bootstrap_seed: int = 0
    calib_dtype: str = "float32"                     # the shared calibration sets' sampler (HIGHEST precision)
    calib_seeds: Tuple[int, ...] = (2025,)           # calibration seeds of every preset (the official seed first)
    extra_calib: Tuple[Tuple[str, Tuple[int, ...]], ...] = (("w4a4", (2026,)),)   # more calib seeds per preset
    zero_shot_images: int = 1000                     # real inputs of the zero-shot rows (runs.zero_shot_rows)

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"protocol seeds must be distinct and at least one, got {self.seeds}")
        if set(self.noise_seeds) & set(self.seeds) or len(set(self.noise_seeds)) != len(self.noise_seeds):
            raise ValueError(f"noise seeds {self.noise_seeds} must be distinct and differ from the seeds "
                             f"{self.seeds} (the noise floor compares FP sets made with other keys)")
        if self.noise_seeds and len(self.noise_seeds) != len(self.seeds):
            raise ValueError(f"the noise floor pairs one noise seed with each seed: {len(self.seeds)} seeds, "
                             f"{len(self.noise_seeds)} noise seeds")
        if self.images_per_seed < 2:
            raise ValueError(f"images_per_seed must be at least 2, got {self.images_per_seed}")
        if self.replicates < 0:
            raise ValueError(f"replicates must be >= 0, got {self.replicates}")
        if not self.calib_seeds:
            raise ValueError("at least one calibration seed is needed")
        if self.zero_shot_images < 2:
            raise ValueError(f"zero_shot_images must be at least 2, got {self.zero_shot_images}")
        if self.calib_dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"calib_dtype must be float32, bfloat16 or auto, got {self.calib_dtype!r}")

    @property
    def num_images(self) -> int:
        return len(self.seeds) * self.images_per_seed

    def calib_seeds_of(self, preset: str) -> Tuple[int, ...]:
        extra = dict(self.extra_calib).get(preset, ())
        return tuple(dict.fromkeys(self.calib_seeds + tuple(extra)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["extra_calib"] = {p: list(s) for p, s in self.extra_calib}
        return d


def from_dict(d: Mapping) -> Protocol:
    d = dict(d)
    d["extra_calib"] = tuple((p, tuple(s)) for p, s in dict(d.get("extra_calib", {})).items())
    return Protocol(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --- the per-image data of a row ----------------------------------------------------------------------------------
def pooled(per_image: Sequence[Mapping[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    """One row's images over the seeds, in seed order: {"correct": [n] bool, "features": [n, D]}."""
    return {"correct": np.concatenate([p["predicted"] == p["labels"] for p in per_image]),
            "features": np.concatenate([p["features"] for p in per_image])}


def check_paired(sets: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, np.ndarray]) -> None:
    """Rows are compared image by image: every row must hold the same labels in the same order."""
    first = next(iter(labels))
    for name, lab in labels.items():
        if lab.shape != labels[first].shape or not np.array_equal(lab, labels[first]):
            raise ValueError(f"row {name} was sampled with other labels than {first}: rows are not paired")


# --- bootstrap ----------------------------------------------------------------------------------------------------
def bootstrap(sets: Mapping[str, Mapping[str, np.ndarray]], real_features: Optional[np.ndarray], fp: str,
              protocol: Protocol) -> Dict[str, Dict[str, Tuple[float, np.ndarray]]]:
    """{row: {metric: (estimate on all images, values per replicate)}}; the noise row's fd_fp is its distance to
    the FP set of the seeds (index-paired by position)."""
    n = len(next(iter(sets.values()))["correct"])
    return paired.set_replicates(dict(sets), real_features, fp, replicate_indices(n, protocol))


def replicate_indices(n: int, protocol: Protocol) -> np.ndarray:
    """The protocol's [replicates, n] bootstrap indices (none when replicates = 0)."""
    indices = paired.replicate_indices(n, max(protocol.replicates, 1), protocol.bootstrap_seed)
    return indices[:protocol.replicates]


def row_intervals(values: Mapping[str, Tuple[float, np.ndarray]]) -> Dict[str, dict]:
    out = {}
    for metric, (estimate, reps) in values.items():
        if len(reps):
            floor, ceiling = RANGES.get(metric, (0.0 if metric.startswith("fd") else None, None))
            i = paired.interval_of(estimate, reps, floor=floor, ceiling=ceiling)
            out[metric] = {"estimate": i.estimate, "low": i.low, "high": i.high}
    return out


def in_fp_set(name: str, k: int) -> str:
    """A row's name in FP set k of a merged table (`runs.ablation.merge`): set 0 keeps it, set k ≥ 1 adds '@k+1'
    where it would clash with set 0's ('fp@2', 'w4a4_full@2')."""
    return name if k == 0 else f"{name}@{k + 1}"


def fp_of(row: dict, fp: str = "fp") -> str:
    """The name of the FP row (or noise row, fp=NOISE_ROW) of the row's FP set."""
    return in_fp_set(fp, row.get("fp_set", 0))


def in_set(c: dict, row: dict) -> dict:
    """A comparison within one FP set records it (tables of one set have none)."""
    return dict(c, fp_set=row["fp_set"]) if "fp_set" in row else c


def comparisons(rows: Sequence[dict], values: Mapping[str, Mapping[str, Tuple[float, np.ndarray]]],
                fp: str = "fp") -> List[dict]:
    """Every difference the table states, Holm-adjusted together: each method pair of COMPARISONS within a preset,
    calibration seed and FP set, and each quantized row against its FP set's FP class accuracy."""
    out = []
    q = [r for r in rows if r["preset"] != "fp"]
    groups = list(dict.fromkeys((r["preset"], r.get("calib_seed"), r.get("fp_set")) for r in q))
    for preset, cs, k in groups:
        by_method = {r["method"]: r for r in q
                     if r["preset"] == preset and r.get("calib_seed") == cs and r.get("fp_set") == k}
        for what, a, b in COMPARISONS:
            if a not in by_method or b not in by_method:
                continue
            ra, rb = by_method[a]["name"], by_method[b]["name"]
            for metric, _, lower in METRICS:
                if metric in values.get(ra, {}) and metric in values.get(rb, {}):
                    out.append(in_set(compare(what, preset, cs, ra, rb, metric, lower, values), by_method[a]))
    for r in q:
        if "class_accuracy" in values.get(r["name"], {}) and "class_accuracy" in values.get(fp_of(r, fp), {}):
            out.append(in_set(compare("against FP", r["preset"], r.get("calib_seed"), fp_of(r, fp), r["name"],
                                       "class_accuracy", False, values), r))
    return adjust(out)


def calibration_comparisons(rows: Sequence[dict], values: Mapping[str, Mapping[str, Tuple[float, np.ndarray]]]
                            ) -> List[dict]:
    """The same method on other calibration sets (a preset's first calibration seed → each further one) on every
    metric, Holm-adjusted as their own family: how far the calibration data alone moves a row, beside which the
    method differences are read. Not method claims, so they do not enlarge the main family."""
    out = []
    q = [r for r in rows if r["preset"] != "fp" and r.get("calib_seed") is not None]
    for preset, method, k in dict.fromkeys((r["preset"], r["method"], r.get("fp_set")) for r in q):
        same = [r for r in q if r["preset"] == preset and r["method"] == method and r.get("fp_set") == k]
        for r in same[1:]:
            for metric, _, lower in METRICS:
                if metric in values.get(same[0]["name"], {}) and metric in values.get(r["name"], {}):
                    c = compare("calibration set", preset, r["calib_seed"], same[0]["name"], r["name"], metric,
                                lower, values)
                    out.append(in_set(dict(c, calib_from=same[0]["calib_seed"]), r))
    return adjust(out)


def adjust(comps: List[dict]) -> List[dict]:
    """One family of comparisons: Holm-adjusted p-values over those with a p, and each one's verdict."""
    testable = [c for c in comps if c["p"] is not None]
    for c, adj in zip(testable, paired.holm([c["p"] for c in testable])):
        c["p_holm"] = adj
    for c in comps:
        c["verdict"] = verdict_of(c)
    return comps


def compare(what, preset, calib_seed, a, b, metric, lower, values) -> dict:
    """One stated difference, b − a on `metric`, from the stored replicates (no p when there are none)."""
    (ea, va), (eb, vb) = values[a][metric], values[b][metric]
    c = {"what": what, "preset": preset, "calib_seed": calib_seed, "a": a, "b": b, "metric": metric,
         "lower_is_better": lower, "estimate": float(eb - ea), "low": None, "high": None, "p": None, "p_holm": None}
    if len(va) and len(vb):
        d = paired.difference_of(ea, va, eb, vb)
        c.update(low=d.low, high=d.high, p=d.p)
    return c


NO_CALL = ("no interval (replicates = 0)", "no measurable difference")


def verdict_of(c: dict) -> str:
    """better / worse only where the Holm-adjusted test and the interval both exclude 0."""
    if c["p_holm"] is None:
        return NO_CALL[0]
    if c["p_holm"] >= 1 - paired.LEVEL or not (c["low"] > 0 or c["high"] < 0):
        return NO_CALL[1]
    return "better" if (c["estimate"] < 0) == c["lower_is_better"] else "worse"


# --- words ----------------------------------------------------------------------------------------------------------
def _fmt(x) -> str:
    return "–" if x is None else f"{x:+.4g}"


def findings(rows: Sequence[dict], comps: Sequence[dict], protocol: Protocol) -> List[str]:
    """What the intervals allow to say: method differences (Holm-adjusted over all of them), losses against FP,
    the noise floor, and whether a method difference holds on every calibration seed."""
    lines = []
    titles = {m: t for m, t, _ in METRICS}
    tested = [c for c in comps if c["p_holm"] is not None]
    if tested:
        lines.append(f"{len(tested)} comparison{'s are' if len(tested) != 1 else ' is'} stated below (method pairs "
                     f"within a bit setting and calibration seed on {', '.join(titles[m] for m, _, _ in METRICS)}, "
                     f"and each quantized row's class accuracy against FP); p-values (each difference over its "
                     f"bootstrap standard error) are Holm-adjusted over all {len(tested)}, intervals are 95 % paired "
                     f"bootstrap intervals ({protocol.replicates} replicates over {protocol.num_images} images).")
    by_name = {r["name"]: r for r in rows}
    sets = sorted({r["fp_set"] for r in rows if "fp_set" in r})
    if sets:
        lines.append(f"The rows form {len(sets)} FP sets (see the notes): each difference below lies within one set, "
                     f"and rows of different sets are not compared.")
    lines += _unpaired(rows)
    for k in sets or [None]:
        noise = by_name.get(NOISE_ROW if k is None else fp_of({"fp_set": k}, NOISE_ROW))
        if noise is not None and noise.get("intervals", {}).get("fd_fp"):
            i = noise["intervals"]["fd_fp"]
            lines.append(f"Noise floor{'' if k is None else f' of FP set {k + 1}'}: two FP sets of "
                         f"{protocol.num_images} images with other keys are FD {i['estimate']:.4g} [{i['low']:.4g}, "
                         f"{i['high']:.4g}] apart: a quantized row's FD to FP within this range cannot be told from "
                         f"sampling the FP model again.")
    for c in comps:
        model = bits(by_name[c["b"]])
        seed = ("" if c["calib_seed"] is None else f", calib seed {c['calib_seed']}") + set_words(c)
        if c["what"] == "against FP":
            lines.append(f"{model} {by_name[c['b']]['method']}{seed}: {_stated(c, 'class accuracy against FP')}: "
                         f"{c['verdict']}.")
        else:
            lines.append(f"{model}{seed}, {c['what']} ({by_name[c['a']]['method']} → {by_name[c['b']]['method']}): "
                         f"{_stated(c, titles[c['metric']])}: {c['verdict']}.")
    lines += _consistency(comps, by_name)
    return lines


def calibration_findings(rows: Sequence[dict], comps: Sequence[dict]) -> List[str]:
    """The calibration-set family in words, with the largest spread per metric (tested or not)."""
    if not comps:
        return []
    tested = [c for c in comps if c["p_holm"] is not None]
    titles = {m: t for m, t, _ in METRICS}
    by_name = {r["name"]: r for r in rows}
    widest = {m: max((c for c in comps if c["metric"] == m), key=lambda c: abs(c["estimate"]), default=None)
              for m, _, _ in METRICS}
    spread = "; ".join(f"{titles[m]} {_fmt(c['estimate'])} ({bits(by_name[c['b']])} {by_name[c['b']]['method']})"
                       for m, c in widest.items() if c is not None)
    lines = [f"Calibration sets: {len(comps)} comparisons of the same method on another calibration set (a preset's "
             f"first calibration seed → each further one), Holm-adjusted as their own family of {len(tested)}; the "
             f"largest moves (before the adjustment): {spread}. A method difference of this size can come from the "
             f"calibration data alone."]
    for c in comps:
        r = by_name[c["b"]]
        verdict = c["verdict"] if c["verdict"] in NO_CALL else "the calibration sets give different models"
        lines.append(f"{bits(r)} {r['method']}{set_words(c)}, calibration seed {c['calib_from']} → "
                     f"{c['calib_seed']}: "
                     f"{_stated(c, titles[c['metric']])}: {verdict}.")
    return lines


def _stated(c: dict, title: str) -> str:
    """'title +d [low, high] (Holm p …)': one stated difference."""
    return f"{title} {_fmt(c['estimate'])} [{_fmt(c['low'])}, {_fmt(c['high'])}] (Holm p {_p(c)})"


def set_words(c: dict) -> str:
    """', FP set k' for a comparison within one FP set of a merged table (nothing in a table of one set)."""
    return f", FP set {c['fp_set'] + 1}" if "fp_set" in c else ""


def _p(c) -> str:
    return "–" if c["p_holm"] is None else f"{c['p_holm']:.3g}"


def bits(row: dict) -> str:
    """A row's model as tables name it: 'FP' or 'W4A6'."""
    return "FP" if row["preset"] == "fp" else f"W{row['w_bits']}A{row['a_bits']}"


def _unpaired(rows: Sequence[dict]) -> List[str]:
    """Method pairs of COMPARISONS whose rows are both in the table, but in no common FP set: not paired image by
    image, so not stated; said, so that a reader does not take the missing line for a missing run."""
    q = [r for r in rows if r["preset"] != "fp" and "fp_set" in r]
    lines = []
    for preset, cs in dict.fromkeys((r["preset"], r.get("calib_seed")) for r in q):
        group = [r for r in q if r["preset"] == preset and r.get("calib_seed") == cs]
        sets: Dict[str, set] = {}
        for r in group:
            sets.setdefault(r["method"], set()).add(r["fp_set"])
        where = lambda m: " and ".join(f"FP set {k + 1}" for k in sorted(sets[m]))
        seed = "" if cs is None else f", calib seed {cs}"
        for what, a, b in COMPARISONS:
            if a in sets and b in sets and not sets[a] & sets[b]:
                lines.append(f"Not compared: {bits(group[0])}{seed}, {what} ({a} → {b}): {a} is in {where(a)}, "
                             f"{b} in {where(b)}, and rows of different FP sets are not paired (running {a} again in "
                             f"{b}'s FP set would give the comparison).")
    return lines


def _consistency(comps: Sequence[dict], by_name) -> List[str]:
    """A method difference measured on several calibration sets: say whether the verdicts agree."""
    lines = []
    keyed: Dict[tuple, list] = {}
    for c in comps:
        if c["what"] != "against FP":
            keyed.setdefault((c["preset"], c["what"], c["metric"], c.get("fp_set")), []).append(c)
    for (preset, what, metric, _), cs in keyed.items():
        if len({c["calib_seed"] for c in cs}) < 2:
            continue
        verdicts = {c["calib_seed"]: c["verdict"] for c in cs}
        same = len(set(verdicts.values())) == 1
        lines.append(f"{bits(by_name[cs[0]['b']])}{set_words(cs[0])}, {what} on {metric} over {len(verdicts)} "
                     f"calibration seeds: "
                     + ("the same on every one" if same else "not the same on every calibration set") + " ("
                     + ", ".join(f"seed {s}: {v}" for s, v in verdicts.items()) + ").")
    return lines


# --- replicate values beside a table (tables made in parts are joined on them) ----------------------------------
def save_values(path: str, values: Mapping[str, Mapping[str, Tuple[float, np.ndarray]]]) -> None:
    from varq_jax.files import atomic_write
    arrays = {f"{row}/{metric}": np.asarray(v[1], np.float64) for row, ms in values.items() for metric, v in ms.items()}
    estimates = {f"{row}/{metric}": float(v[0]) for row, ms in values.items() for metric, v in ms.items()}
    keys = sorted(arrays)
    # compressed: a third smaller, losslessly (the parts travel to the GPU with the tree, whose size is capped)
    atomic_write(path, lambda f: np.savez_compressed(f, keys=np.array(keys),
                                                     estimates=np.array([estimates[k] for k in keys]),
                                                     **{f"v{i}": arrays[k] for i, k in enumerate(keys)}))


def load_values(path: str) -> Dict[str, Dict[str, Tuple[float, np.ndarray]]]:
    if not os.path.exists(path):
        raise ValueError(f"the bootstrap values of a part are missing: {path!r} (written beside its .json)")
    out: Dict[str, Dict[str, Tuple[float, np.ndarray]]] = {}
    with np.load(path) as f:
        for i, key in enumerate(f["keys"]):
            row, metric = str(key).split("/")
            out.setdefault(row, {})[metric] = (float(f["estimates"][i]), f[f"v{i}"])
    return out


def values_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".replicates.npz"
