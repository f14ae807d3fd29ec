"""Do integer execution and the simulation give the same images' quality? Paired intervals from two ablation parts.

A part made with `experiments.ablate --execution=int` and a part of the same runs simulated (same model, protocol,
keys and calibration set) hold per-replicate values on the same bootstrap indices, so each metric's difference
int − simulate has a paired interval (`paired.difference_of`). "Agree within the noise" = every interval holds 0.
  python benchmarks/integer/int_vs_sim.py INT_PART.json SIM_PART.json[,SIM_PART2.json…] [OUT.json]
"""
import json
import sys

from varq_jax.eval import paired
from varq_jax.runs import ablation, protocol

METRICS = [(m, title) for m, title, _ in protocol.METRICS]


def _part(path):
    part = json.load(open(path))
    return part, protocol.load_values(protocol.values_path(path))


def _settings(part) -> dict:
    """What a merge requires parts to share (`ablation.SHARED`), less the execution."""
    return {**{k: part.get(k) for k in ablation.SHARED},
            "eval": {k: v for k, v in part["eval"].items() if k != "execution"}}


def compare(int_path: str, sim_paths) -> dict:
    ip, iv = _part(int_path)
    if ip["eval"].get("execution") != "int":
        raise ValueError(f"{int_path} is not a part of integer execution (its eval: {ip['eval']})")
    out = {"int_part": int_path, "sim_parts": list(sim_paths), "rows": []}
    for sim_path in sim_paths:
        sp, sv = _part(sim_path)
        differ = [k for k in ablation.SHARED if _settings(ip)[k] != _settings(sp)[k]]
        if differ:
            raise ValueError(f"{sim_path} is not the same table as {int_path}: {', '.join(differ)} differ")
        for row in ip["rows"]:
            if row["preset"] == "fp" or row["name"] not in sv:
                continue
            sim_row = next(r for r in sp["rows"] if r["name"] == row["name"])
            if sim_row.get("calibration") != row.get("calibration"):
                raise ValueError(f"{row['name']}: the parts' calibration sets differ")
            diffs = {m: paired.difference_of(*sv[row["name"]][m], *iv[row["name"]][m]).to_dict()
                     for m, _ in METRICS}
            out["rows"].append({"name": row["name"], "theta": [sim_row.get("theta"), row.get("theta")],
                                "simulate": {m: sv[row["name"]][m][0] for m, _ in METRICS},
                                "int": {m: iv[row["name"]][m][0] for m, _ in METRICS}, "int_minus_sim": diffs,
                                "agree": not any(paired.Interval(**d).excludes_zero for d in diffs.values())})
    return out


def main(argv):
    res = compare(argv[1], argv[2].split(","))
    for r in res["rows"]:
        print(f"{r['name']}: " + "; ".join(
            f"{title} {r['simulate'][m]:.4g} → {r['int'][m]:.4g}, Δ {d['estimate']:+.3g} [{d['low']:+.3g}, "
            f"{d['high']:+.3g}]" for (m, title), d in zip(METRICS, r["int_minus_sim"].values()))
            + ("  — no measurable difference" if r["agree"] else "  — DIFFERS"))
    if len(argv) > 3:
        with open(argv[3], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv)
