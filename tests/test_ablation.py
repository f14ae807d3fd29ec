"""The ablation driver and the diagnostics.

The driver runs on a saved tiny random-weight checkpoint with a random-weight classifier whose export claims
training (a plumbing fixture, as in test_evaluate): a full PTQ + evaluation of the shipped 64-px model per row takes
about a minute on a 2-core CPU. Its numbers only check that the table reports each run's own results. The A·V
diagnostic is checked on the shipped model against an independent NumPy computation.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_generate import FAST, random_like, small_model
from varq_jax import checkpoint, default_model
from varq_jax.eval.evaluate import EvalConfig
from varq_jax.models import classifier as clf
from varq_jax.models.var import VAR
from varq_jax.models.vqvae import VQVAE
from varq_jax import cli
from varq_jax.quant import calibration, diagnostics, pipeline
from varq_jax.eval import evaluate as ev
from varq_jax.eval import metrics, paired
from varq_jax.runs import ablation, results_table, stopping
from varq_jax.runs import protocol as protocol_lib
from varq_jax.runs.protocol import NOISE_ROW, Protocol
from varq_jax.quant.policy import QuantPolicy
from varq_jax.train import export
from configs import ptq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"calib.num_samples": "4", "calib.batch_size": "4", "recon.iters": "5", "samples.num": "0",
             "dtype": "float32", "theta.n_grids": "1000"}
EVAL = EvalConfig(num_images=20, per_device_batch=2, shard_size=2, feature_batch=2, dtype="float32", top_k=16,
                  compiler_options=tuple(FAST.items()))


# --- the driver on a tiny checkpoint --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    m = small_model()
    checkpoint.save(str(root / "model"), m.vae_cfg, m.var_cfg, m.params, meta=m.meta)
    cfg = clf.ClassifierConfig(num_classes=10, widths=(8, 16), feature_dim=8, groups=8)
    params = random_like(jax.eval_shape(lambda: clf.init_params(cfg, jax.random.PRNGKey(3), 16)))
    export.save(str(root / "clf"), params, kind="classifier", config=cfg, meta={"steps": 1, "eval": {"acc": 1.0}})
    return root


PROTOCOL = Protocol(seeds=(0, 1), images_per_seed=10, noise_seeds=(2, 3), replicates=200, extra_calib=())
NAMES = ["fp", NOISE_ROW, "w4a6_baseline", "w4a6_brecq"]


def _ablate(root, out="RESULTS.md", log=None, protocol=PROTOCOL, eval_config=EVAL, **kwargs):
    return ablation.run_ablation(cli.ablation_plan(["w4a6"], ["baseline", "brecq"], OVERRIDES),
                                 dataclasses.replace(eval_config, classifier=str(root / "clf")), str(root / "wd"),
                                 str(root / out), checkpoint=str(root / "model"), diag_samples=2, command="test",
                                 protocol=protocol, log=log or (lambda s: None), **kwargs)


@pytest.fixture(scope="module")
def ablation_run(inputs):
    logs = []
    result = _ablate(inputs, log=logs.append)
    return inputs, result, logs


def _pooled(root, name, seeds=PROTOCOL.seeds):
    run_dir = root / "wd" / ("fp" if name in ("fp", NOISE_ROW) else name)
    return protocol_lib.pooled([ev.load_per_image(str(run_dir / f"eval_s{s}" / ev.PER_IMAGE)) for s in seeds])


def test_table_rows_are_the_runs_own_results(ablation_run):
    root, result, _ = ablation_run
    rows = json.load(open(root / "RESULTS.json"))["rows"]
    assert rows == result["rows"]
    assert [r["name"] for r in rows] == NAMES
    fp = _pooled(root, "fp")
    for r in rows:
        seeds = PROTOCOL.noise_seeds if r["name"] == NOISE_ROW else PROTOCOL.seeds
        data = _pooled(root, r["name"], seeds)
        assert r["num_images"] == len(data["correct"]) == 20
        assert r["class_accuracy"] == pytest.approx(np.mean(data["correct"]))
        i = r["intervals"]["class_accuracy"]
        assert i["low"] <= r["class_accuracy"] <= i["high"]
        if r["name"] == "fp":
            assert r["fd_fp"] is None and r["ptq_s"] is None
            continue
        # FD to FP on the pooled images, against an independent implementation (scipy's sqrtm)
        assert r["fd_fp"] == pytest.approx(metrics.frechet_distance(data["features"], fp["features"]), rel=1e-6)
        if r["name"] == NOISE_ROW:
            continue
        rep = json.load(open(root / "wd" / r["name"] / "ptq" / "report.json"))
        for s in PROTOCOL.seeds:
            e = json.load(open(root / "wd" / r["name"] / f"eval_s{s}" / "results.json"))
            assert e["references"]["ref_samples"] == str(root / "wd" / "fp" / f"eval_s{s}" / "samples.npz")
            assert e["samples"]["seed"] == s and e["samples"]["num_images"] == 10
        assert r["bops_quantized"] == rep["bops"]["quantized"]
        assert r["ptq_s"] == rep["stages"]["total"] and r["theta"] == rep.get("theta") is None
        assert (r["w_bits"], r["a_bits"]) == (4, 6) == (rep["config"]["w_bits"], rep["config"]["a_bits"])
        assert rep["config"]["recon"]["iters"] == 5 and rep["config"]["calib"]["num_samples"] == 4   # overrides
        assert rep["config"]["calib"]["seed"] == r["calib_seed"] and rep["config"]["calib"]["dtype"] == "float32"
        assert ("reconstruction" in rep) == (r["method"] == "brecq")
    md = (root / "RESULTS.md").read_text()
    assert "not FID" in md and "Command: `test`" in md and "RANDOM WEIGHTS" in md
    table = [line for line in md.splitlines() if line.startswith("| FP |") or line.startswith("| W4A6 |")]
    assert len(table) == len(rows)
    for line, r in zip(table, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        i = r["intervals"]["class_accuracy"]
        assert cells[1] == r["method"] and cells[2] == ("–" if r["calib_seed"] is None else str(r["calib_seed"]))
        assert cells[3] == f"{r['class_accuracy']:.4f} [{i['low']:.4f}, {i['high']:.4f}]"
        assert cells[6] == f"{r['bops_quantized'] / 1e9:.3f} G" and cells[10] == f"{r['eval_s']:.1f}"


def test_rows_of_a_calibration_seed_share_one_calibration_set(ablation_run):
    root, result, _ = ablation_run
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["w4a6_baseline"]["calibration"] == rows["w4a6_brecq"]["calibration"] is not None
    rep = json.load(open(root / "wd" / "w4a6_brecq" / "ptq" / "report.json"))
    assert rep["config"]["calibration_from"].startswith(str(root / "wd" / "w4a6_baseline" / "ptq"))
    md = (root / "RESULTS.md").read_text()
    assert f"seed 2025: {rows['w4a6_baseline']['calibration'][:12]}" in md and "float32" in md


def test_runs_on_more_calibration_seeds_are_rows_of_their_own():
    p = Protocol(extra_calib=(("w4a6", (2026,)),))
    runs = ablation.protocol_runs(cli.ablation_plan(["w8a8", "w4a6"], ["baseline", "brecq"], {}), p)
    assert [r.name for r in runs] == ["w8a8_baseline", "w8a8_brecq", "w4a6_baseline", "w4a6_baseline_c2026",
                                      "w4a6_brecq", "w4a6_brecq_c2026"]
    assert [r.config.calib.seed for r in runs] == [2025, 2025, 2025, 2026, 2025, 2026]
    assert {r.config.calib.dtype for r in runs} == {"float32"}


def test_intervals_are_a_numpy_bootstrap_over_image_indices(ablation_run):
    """The stored bootstrap values against a plain NumPy bootstrap of the same indices (scipy's FD)."""
    root, result, _ = ablation_run
    values = protocol_lib.load_values(protocol_lib.values_path(str(root / "RESULTS.md")))
    data, fp = _pooled(root, "w4a6_brecq"), _pooled(root, "fp")
    idx = np.random.default_rng(PROTOCOL.bootstrap_seed).integers(0, 20, size=(PROTOCOL.replicates, 20))
    acc = data["correct"][idx].mean(1)
    np.testing.assert_allclose(values["w4a6_brecq"]["class_accuracy"][1], acc, atol=1e-12)
    row = next(r for r in result["rows"] if r["name"] == "w4a6_brecq")
    theta = data["correct"].mean()
    lo, hi = np.clip(np.percentile(acc + theta - acc.mean(), [2.5, 97.5]), 0, 1)  # bias-free, within [0, 1]
    assert row["intervals"]["class_accuracy"]["low"] == pytest.approx(lo)
    assert row["intervals"]["class_accuracy"]["high"] == pytest.approx(hi)
    for k in (0, 7):
        fd = metrics.frechet_distance(data["features"][idx[k]], fp["features"][idx[k]])
        assert values["w4a6_brecq"]["fd_fp"][1][k] == pytest.approx(fd, rel=1e-5)
    c = next(c for c in result["comparisons"] if c["what"] == "reconstruction" and c["metric"] == "class_accuracy"
             and c["calib_seed"] == 2025)
    base = _pooled(root, "w4a6_baseline")["correct"][idx].mean(1)
    d = acc - base
    theta = theta - _pooled(root, "w4a6_baseline")["correct"].mean()
    assert (c["low"], c["high"]) == pytest.approx(tuple(np.percentile(d + theta - d.mean(), [2.5, 97.5])))


def test_diagnostics_and_findings_in_the_results(ablation_run):
    root, result, _ = ablation_run
    (d,) = result["diagnostics"]["av_error"]
    assert d["a_bits"] == 6 and d["theta"] > 0 and d["tokens_from"] == "w4a6_baseline"
    assert len(d["plain"]) == len(d["shift_and_sum"]) == 3
    assert result["diagnostics"]["frequency_mismatch"] == []            # neither method resamples
    tested = [c for c in result["comparisons"] if c["p_holm"] is not None]
    assert len(tested) == 3 + 2                     # reconstruction on 3 metrics, 2 rows against FP
    assert f"{len(tested)} comparisons are stated below" in result["findings"][0]
    assert any(f.startswith("Noise floor: two FP sets of 20 images") for f in result["findings"])
    md = (root / "RESULTS.md").read_text()
    assert "## What the numbers show" in md and "A·V relative L2 error per scale, A6" in md


def test_second_call_skips_finished_runs_and_a_changed_config_is_refused(ablation_run):
    root, result, _ = ablation_run
    logs = []
    again = _ablate(root, "RESULTS2.md", log=logs.append)
    assert again["rows"] == result["rows"] and again["comparisons"] == result["comparisons"]
    assert sum("skipped" in s for s in logs) == 4 + 2 * 3        # fp and noise evals; 2 × (PTQ, 2 evals)
    with pytest.raises(ValueError, match="another config"):
        ablation.run_ablation(cli.ablation_plan(["w4a6"], ["brecq"], {**OVERRIDES, "recon.iters": "6"}),
                              dataclasses.replace(EVAL, classifier=str(root / "clf")), str(root / "wd"),
                              str(root / "R3.md"), checkpoint=str(root / "model"), protocol=PROTOCOL,
                              log=lambda s: None)
    assert not (root / "R3.md").exists()


def _split(result: dict) -> list:
    """The one-invocation result as two parts (one method each), as two invocations on its workdir would write them:
    (parts, their bootstrap values)."""
    fp_rows = [r for r in result["rows"] if r["preset"] == "fp"]
    parts, values = [], []
    for i, method in enumerate(["baseline", "brecq"]):
        rows = [r for r in result["rows"] if r["method"] == method]
        p = json.loads(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}))
        p.update(rows=fp_rows + rows, presets=["w4a6"], methods=[method], command=f"part {i}",
                 diagnostics={"av_error": result["diagnostics"]["av_error"] if i == 0 else [],
                              "frequency_mismatch": []})
        parts.append(p)
        values.append({k: v for k, v in result["_values"].items() if k in {r["name"] for r in fp_rows + rows}})
    return parts[::-1], values[::-1]                             # given out of order


def test_merged_parts_give_the_one_invocation_table(ablation_run):
    root, result, _ = ablation_run
    parts, values = _split(result)
    merged = ablation.merge(parts, values=values, command="merge", method_order=cli.METHODS)
    assert merged["rows"] == result["rows"] and merged["comparisons"] == result["comparisons"]
    assert merged["diagnostics"] == result["diagnostics"] and merged["findings"] == result["findings"]
    assert [p["command"] for p in merged["parts"]] == ["part 1", "part 0"]
    ck = checkpoint.load(str(root / "model"))           # the A·V diagnostic recomputed at the merge: same tokens, θ
    again = ablation.merge(parts, values=values, ck=ck, workdir=str(root / "wd"), diag_samples=2,
                           method_order=cli.METHODS, make_plan=cli.ablation_plan, log=lambda s: None)
    assert again["diagnostics"]["av_error"] == result["diagnostics"]["av_error"]
    results_table.write(str(root / "MERGED.md"), merged)
    md = (root / "MERGED.md").read_text()
    assert "Made in 2 parts" in md and "`part 0`" in md and "Merged by `merge`" in md
    assert [line for line in md.splitlines() if line.startswith("| W4A6 |")] == \
        [line for line in (root / "RESULTS.md").read_text().splitlines() if line.startswith("| W4A6 |")]


def test_merge_refuses_parts_that_do_not_belong_together(ablation_run):
    _, result, _ = ablation_run
    (a, b), _ = _split(result)
    with pytest.raises(ValueError, match="differs from part 0 in num_images"):
        ablation.merge([a, {**b, "num_images": 21}])
    b_fp = json.loads(json.dumps(b))
    b_fp["rows"][0]["fd_real"] += 1e3                          # far beyond the noise floor
    with pytest.raises(ValueError, match="FP rows differ"):
        ablation.merge([a, b_fp])
    with pytest.raises(ValueError, match="more than one part"):
        ablation.merge([a, a])
    with pytest.raises(ValueError, match="nothing to merge"):
        ablation.merge([])
    with pytest.raises(ValueError, match="made before the evaluation protocol"):
        ablation.merge([a, {k: v for k, v in b.items() if k != "protocol"}])
    assert a["eval"]["execution"] == "simulate"
    with pytest.raises(ValueError, match="differs from part 0 in eval"):     # a table holds one execution
        ablation.merge([a, {**b, "eval": {**b["eval"], "execution": "int"}}])
    older = {**b, "eval": {k: v for k, v in b["eval"].items() if k != "execution"}}   # parts before the field
    assert sorted(r["name"] for r in ablation.merge([a, older])["rows"]) == sorted(r["name"] for r in result["rows"])


def test_an_evaluation_is_reused_only_for_its_own_execution(ablation_run):
    root, _, _ = ablation_run
    path = next((root / "wd").glob("w4a6_*/eval_s0/results.json"))
    results = json.loads(path.read_text())
    assert results["samples"]["execution"] == "simulate"
    config = dataclasses.replace(EVAL, seed=results["samples"]["seed"],
                                 ref_samples=results["references"]["ref_samples"])
    n, vocab = results["samples"]["num_images"], checkpoint.load(str(root / "model")).var_cfg.vocab_size
    assert ablation._eval_reusable(results, config, n, vocab, "simulate")
    assert not ablation._eval_reusable(results, dataclasses.replace(config, execution="int"), n, vocab, "int")


def test_cli_merge_writes_the_table_and_rejects_a_bad_file(ablation_run, tmp_path):
    _, result, _ = ablation_run
    files = []
    for i, (p, v) in enumerate(zip(*_split(result))):
        files.append(tmp_path / f"p{i}.json")
        files[-1].write_text(json.dumps(p))
        protocol_lib.save_values(protocol_lib.values_path(str(tmp_path / f"p{i}.md")), v)
    run = lambda *args: subprocess.run([sys.executable, "-m", "experiments.ablate", *args], cwd=ROOT,
                                       capture_output=True, text=True, timeout=300)
    r = run(f"--merge={files[0]},{files[1]}", f"--out={tmp_path}/R.md", "--diag_samples=0",
            "--planned_also=w4a4_litevar", "--zero_shot=w4a6_baseline,w4a6_brecq")
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "R.json"))["rows"] == result["rows"]
    md = (tmp_path / "R.md").read_text()            # the planned rows no part holds, zero-shot ones apart
    not_run = next(line for line in md.splitlines() if line.startswith("- Rows of the planned table not run yet"))
    names = not_run.split(": ", 1)[1].split(", ")
    assert "w8a8_baseline" in names and names[-1] == "w4a4_litevar" and "w4a6_brecq" not in names
    assert "Zero-shot rows planned and not run yet: w4a6_baseline, w4a6_brecq" in md
    (tmp_path / "bad.json").write_text("{not json")
    r = run(f"--merge={files[0]},{tmp_path}/bad.json", f"--out={tmp_path}/R2.md", "--diag_samples=0")
    assert r.returncode != 0 and "cannot read ablation result" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "R2.md").exists()
    r = run(f"--merge={files[0]},{files[1]}", f"--out={tmp_path}/R3.md", "--planned_also=w4a4_lightvar")
    assert r.returncode != 0 and "'w4a4_lightvar' is not a run" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "R3.md").exists()


@pytest.mark.parametrize("presets, methods, overrides, message", [
    (["w4a7"], ["brecq"], {}, "unknown preset"),
    (["fp"], ["brecq"], {}, "always the first row"),
    (["w4a6"], ["brecq", "sas"], {}, "unknown method"),
    (["w4a6"], ["brecq"], {"recon.iterz": "5"}, "unknown config field"),
    (["w4a6"], ["brecq"], {"recon.iters": "many"}, "recon.iters"),
    (["w4a6"], ["brecq"], {"shift_and_sum": "true"}, "set by the preset and method"),
])
def test_bad_names_fail_before_any_work(tmp_path, presets, methods, overrides, message):
    with pytest.raises(ValueError, match=message):
        ablation.run_ablation(cli.ablation_plan(presets, methods, overrides), EVAL, str(tmp_path / "wd"),
                              str(tmp_path / "R.md"), protocol=PROTOCOL, log=lambda s: None)
    assert not (tmp_path / "wd").exists() and not (tmp_path / "R.md").exists()


def test_cli_bad_input_is_a_clean_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.ablate", "--presets=w4a6,w9a9", f"--workdir={tmp_path}/wd",
                        "--config.recon.iters=5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "unknown preset(s) w9a9" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "wd").exists()
    r = subprocess.run([sys.executable, "-m", "experiments.ablate", "--num_images=5", f"--workdir={tmp_path}/wd"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: --num_images is now --eval.num_images" in r.stderr
    assert not (tmp_path / "wd").exists()


# --- the A·V diagnostic on the shipped model ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _CaptureQKV(QuantPolicy):
    """FP forward that records every attention call's q, k, v."""
    weights: bool = False
    acts: bool = False

    def attention(self, module, q, k, v, scale):
        module.sow("intermediates", "qkv", (q, k, v))
        probs = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q * scale, k), axis=-1)
        return jnp.einsum("bhts,bshd->bthd", probs, v)


def _log2_quant(p, bits):
    n = 2 ** bits
    delta = np.maximum(p.max(-1, keepdims=True), 1e-6)
    code = np.round(-np.log2(p / delta + 1e-20))
    return np.where(code >= n, 0.0, delta * 2.0 ** -np.clip(code, 0, n - 1))


def _v_quant(v, orders, bits):
    """V [B, S, H, D], one (Δ, zp) per (batch, head); a token of order k averages 2^k shifted roundings."""
    n = 2 ** bits
    hi, lo = v.max(axis=(1, 3), keepdims=True), v.min(axis=(1, 3), keepdims=True)
    delta = np.maximum((hi - lo) / (n - 1), 1e-6)
    zp = -np.round(lo / delta)
    x = v / delta
    code = np.round(x)
    for k in (1, 2, 3):
        shifts = [(2 * i + 1) / 2 ** (k + 1) for i in range(-2 ** (k - 1), 2 ** (k - 1))]
        avg = np.mean([np.round(x + s) for s in shifts], axis=0)
        code = np.where((orders == k)[..., None], avg, code)
    return (np.clip(code + zp, 0, n - 1) - zp) * delta


@pytest.fixture(scope="module")
def shipped():
    if default_model.default_path() is None:
        pytest.fail("the embedded default model is not shipped")
    ck = default_model.load_model(None)
    c = ptq.make(4, 6)
    # Four samples in one float32 batch at HIGHEST precision, as the small-budget PTQ runs of other test files
    # draw their calibration sets: the sampler comes from the session's compilation cache.
    labels = calibration.calibration_labels(4, ck.var_cfg.num_classes, c.calib.seed)
    with jax.default_matmul_precision("highest"):
        cal = calibration.generate_calibration(ck.vae_cfg, ck.var_cfg, ck.params, labels, c.calib.seed,
                                               pipeline.calib_settings(c, ck.var_cfg), 4, jnp.float32,
                                               keep_probs=False)
    return ck, cal.labels, cal.tokens


def test_av_error_equals_a_direct_computation(shipped):
    ck, labels, tokens = shipped
    cfg, theta, bits, block, scale = ck.var_cfg, 0.02, 6, 3, 5
    sums = diagnostics.av_error_sums(ck, labels, tokens, bits, theta)
    assert sums.shape == (cfg.depth, cfg.num_scales, 3)

    x = VQVAE(ck.vae_cfg).apply({"params": ck.params["vae"]}, tokens, method=VQVAE.idx_to_var_input)
    both = jnp.concatenate([jnp.asarray(labels), jnp.full(len(labels), cfg.num_classes, jnp.int32)])
    capture = jax.jit(lambda p, labels, x: VAR(cfg, jnp.float32, _CaptureQKV(w_bits=8, a_bits=bits)).apply(
        {"params": p}, labels, x, mutable=["intermediates"]))
    _, sown = capture(ck.params["var"], both, jnp.concatenate([x, x]))
    q, k, v = (np.asarray(t, np.float64) for t in sown["intermediates"][f"blocks_{block}"]["attn"]["qkv"][scale])
    begin, end = cfg.begin_ends[scale]
    assert q.shape[1] == end - begin and k.shape[1] == v.shape[1] == end

    logits = np.einsum("bthd,bshd->bhts", q * cfg.attn_scale, k)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    fp = np.einsum("bhts,bshd->bthd", probs, v)
    mean = probs.mean(axis=2)                                            # [B, H, S]
    orders = sum((mean > theta * 2.0 ** j).astype(int) for j in range(3)).transpose(0, 2, 1)
    assert orders.max() >= 1                                             # some tokens do get shifted copies
    p_hat = _log2_quant(probs, bits)
    sas = np.einsum("bhts,bshd->bthd", p_hat, _v_quant(v, orders, bits))
    plain = np.einsum("bhts,bshd->bthd", p_hat, _v_quant(v, np.zeros_like(orders), bits))
    want = [np.sum((sas - fp) ** 2), np.sum((plain - fp) ** 2), np.sum(fp ** 2)]
    np.testing.assert_allclose(sums[block, scale], want, rtol=1e-5)

    rel = diagnostics.av_error(ck, labels, tokens, bits, theta)
    per_scale = sums.sum(0)
    np.testing.assert_allclose(rel["plain"], np.sqrt(per_scale[:, 1] / per_scale[:, 2]), rtol=1e-12)


@pytest.mark.parametrize("bits, theta", [(6, 0.01), (4, 0.05)])
def test_shift_and_sum_error_is_at_most_plain_on_the_shipped_model(shipped, bits, theta):
    ck, labels, tokens = shipped
    d = diagnostics.av_error(ck, labels, tokens, bits, theta)
    assert all(0 < s <= p for s, p in zip(d["shift_and_sum"], d["plain"])), d
    assert sum(d["shift_and_sum"]) < sum(d["plain"])
    off = diagnostics.av_error(ck, labels, tokens, bits, 1e9)           # θ above every mean: all orders 0
    assert off["shift_and_sum"] == off["plain"] == d["plain"]


def test_model_theta_reads_the_quant_collection():
    var_params = small_model().params["var"]
    assert diagnostics.model_theta(diagnostics.theta_tree(var_params, 0.03)) == pytest.approx(0.03)
    with pytest.raises(ValueError, match="single positive"):
        diagnostics.model_theta({})


def test_frequency_mismatch_is_read_from_the_report():
    assert diagnostics.frequency_mismatch({"stages": {}}) is None
    fm = {"before": [0.5, 0.25], "after": [0.0, 0.125]}
    assert diagnostics.frequency_mismatch({"frequency_mismatch": fm}) == fm
    with pytest.raises(ValueError, match="malformed"):
        diagnostics.frequency_mismatch({"frequency_mismatch": {"before": [0.1], "after": []}})


def test_zero_shot_rows_on_the_same_inputs_with_intervals(ablation_run):
    """The table's runs again with zero-shot rows (PTQ and sampling reused): kept-region PSNR recomputed here from
    the saved results and inputs, intervals, baseline → brecq comparisons Holm-adjusted, merge, a bad row name."""
    from varq_jax.eval import generate as gen_lib
    from varq_jax.runs import zero_shot_rows
    root, _, _ = ablation_run
    proto = dataclasses.replace(PROTOCOL, zero_shot_images=6)
    cfg = dataclasses.replace(EVAL, tasks=("inpaint", "edit"))
    with pytest.raises(ValueError, match="not runs of this table"):
        _ablate(root, out="ZS.md", protocol=proto, eval_config=cfg, zero_shot=["w4a4_full"])
    assert not (root / "ZS.md").exists()
    result = _ablate(root, out="ZS.md", protocol=proto, eval_config=cfg, zero_shot=["w4a6_baseline", "w4a6_brecq"])
    zs = result["zero_shot"]
    assert [(r["task"], r["name"]) for r in zs["rows"]] == [
        (t, n) for t in ("inpaint", "edit") for n in ("fp", "w4a6_baseline", "w4a6_brecq")]
    ck = default_model.load_model(str(root / "model"))
    inputs = zero_shot_rows.make_inputs("shapes", 6, ck, cfg)
    up = ck.vae_cfg.image_size // ck.var_cfg.patch_nums[-1]
    for r in zs["rows"]:
        run_dir = root / "wd" / r["name"] / "zero_shot" / r["task"]
        out, _ = gen_lib.load_samples(str(run_dir / "samples.npz"))
        kept = np.repeat(np.repeat(inputs["keep"][r["task"]], up, 1), up, 2).astype(bool)
        mse = [np.mean((o.astype(float) - i.astype(float))[k] ** 2) for o, i, k in zip(out, inputs["images"], kept)]
        assert r["psnr_kept"] == pytest.approx(np.mean(np.minimum(10 * np.log10(255 ** 2 / np.array(mse)), 100)))
        i = r["intervals"]["psnr_kept"]
        assert i["low"] <= r["psnr_kept"] <= i["high"]
        per = ev.load_per_image(str(run_dir / ev.PER_IMAGE))
        target = inputs["target_labels"] if r["task"] == "edit" else inputs["labels"]
        np.testing.assert_array_equal(per["labels"], target)
        assert r["class_accuracy"] == pytest.approx(np.mean(per["predicted"] == target))
    values = protocol_lib.load_values(protocol_lib.values_path(str(root / "ZS.md")))
    comps = zero_shot_rows.comparisons(zs["rows"], values, pair=("baseline", "brecq"))
    assert len(comps) == 2 * len(zero_shot_rows.METRICS)
    np.testing.assert_allclose([c["p_holm"] for c in comps], paired.holm([c["p"] for c in comps]))
    c = next(c for c in comps if c["task"] == "inpaint" and c["metric"] == "psnr_kept")
    by = {r["name"]: r for r in zs["rows"] if r["task"] == "inpaint"}
    assert c["estimate"] == pytest.approx(by["w4a6_brecq"]["psnr_kept"] - by["w4a6_baseline"]["psnr_kept"])
    md = (root / "ZS.md").read_text()
    assert "## Zero-shot tasks" in md and "### edit" in md and "No baseline/full pair" in md
    merged = ablation.merge([json.load(open(root / "ZS.json"))], values=[values])
    assert merged["zero_shot"]["rows"] == zs["rows"]
    main = json.load(open(root / "RESULTS.json"))     # the zero-shot part re-quantized the table's runs: joined
    main_values = protocol_lib.load_values(protocol_lib.values_path(str(root / "RESULTS.md")))
    joined = ablation.merge([main, json.load(open(root / "ZS.json"))], values=[main_values, values],
                            method_order=cli.METHODS)
    assert joined["rows"] == main["rows"] and joined["zero_shot"]["rows"] == zs["rows"]
    notes = [n for n in joined["eval_notes"] if "quantized it again for its zero-shot rows" in n]
    assert len(notes) == 2       # on the same workdir, so the same model and samples: a paired difference of 0
    assert all("part 1 − part 0, paired: class_accuracy +0 [+0, +0], fd_real +0 [+0, +0]" in n for n in notes), notes
    parts, part_values = [], []                  # one zero-shot row per part, FP sampled again in the second
    for drop in ("w4a6_brecq", "w4a6_baseline"):
        p = json.load(open(root / "ZS.json"))
        p["rows"] = [r for r in p["rows"] if r["name"] != drop]
        p["zero_shot"]["rows"] = [r for r in p["zero_shot"]["rows"] if r["name"] != drop]
        parts.append(p)
        part_values.append({k: v for k, v in values.items() if not k.endswith(drop)})
    for r in parts[1]["zero_shot"]["rows"]:
        if r["name"] == "fp":
            r["psnr_kept"] += 0.5
    two = ablation.merge(parts, values=part_values, method_order=cli.METHODS)
    assert two["zero_shot"]["rows"] == zs["rows"]            # the first part's FP rows
    assert any("differ by at most 0.5 in kept PSNR (dB)" in n for n in two["zero_shot"]["notes"])


def test_a_calibration_set_of_an_earlier_invocation_is_checked_before_any_work(ablation_run):
    root, result, _ = ablation_run
    ck = checkpoint.load(str(root / "model"))
    made = str(root / "wd" / "w4a6_baseline" / "ptq")
    runs = ablation.protocol_runs(cli.ablation_plan(["w4a6"], ["baseline", "brecq"], OVERRIDES), PROTOCOL)
    given = ablation._given_calibration([made], ck, runs, PROTOCOL)
    assert given == {2025: os.path.join(made, "state", "calibration")}
    row = next(r for r in result["rows"] if r["name"] == "w4a6_brecq")
    assert row["calibration"] is not None           # the set every row of the seed shares, named by its fingerprint
    other = ablation.protocol_runs(cli.ablation_plan(["w4a6"], ["baseline"], {**OVERRIDES, "calib.top_k": "7"}),
                                   PROTOCOL)
    with pytest.raises(ValueError, match="does not fit run w4a6_baseline: calib.top_k"):
        ablation._given_calibration([made], ck, other, PROTOCOL)
    seeds = dataclasses.replace(PROTOCOL, calib_seeds=(7,))
    with pytest.raises(ValueError, match="has seed 2025; the runs of this table use 7"):
        ablation._given_calibration([made], ck, ablation.protocol_runs(cli.ablation_plan(["w4a6"], ["baseline"],
                                                                                         OVERRIDES), seeds), seeds)
    with pytest.raises(ValueError, match="two calibration sets of seed 2025"):
        ablation._given_calibration([made, made], ck, runs, PROTOCOL)
    with pytest.raises(ValueError, match="holds no calibration set"):
        _ablate(root, out="R4.md", calibration=[str(root / "clf")])
    assert not (root / "R4.md").exists()


def test_parts_from_separate_device_sessions_merge_within_the_noise_floor(ablation_run):
    _, result, _ = ablation_run
    (a, b), values = _split(result)
    fp, noise = (next(r for r in result["rows"] if r["name"] == n) for n in ("fp", NOISE_ROW))
    gap = abs(noise["fd_real"] - fp["fd_real"])
    near = json.loads(json.dumps(b))
    near["rows"][0]["fd_real"] += 0.01 * gap                  # rounding of another session's kernels
    merged = ablation.merge([a, near], values=values, method_order=cli.METHODS)
    assert merged["rows"][0] == a["rows"][0]                  # part 0's FP row is the table's
    assert any("separate invocations" in n and f"{0.01 * gap:.4g} in FD to real" in n
               for n in merged["eval_notes"])
    far = json.loads(json.dumps(b))
    far["rows"][0]["fd_real"] += 0.2 * gap
    with pytest.raises(ValueError, match="FP rows differ.*fd_real differs by"):
        ablation.merge([a, far], values=values)


def test_parts_of_another_gpu_form_an_fp_set_compared_only_within_it(ablation_run, tmp_path):
    """FP rows beyond the tolerance (another kind of GPU): refused, or with fp_sets a set of its own — its FP rows
    as rows 'fp@2', its runs tagged, a run of set 1 quantized again there a row of its own ('…@2', with the paired
    note), every comparison within one set, each row against its own set's FP."""
    _, result, _ = ablation_run
    (brecq, base), values = _split(result)                   # part 0: w4a6_brecq, part 1: w4a6_baseline
    fp, noise = (next(r for r in result["rows"] if r["name"] == n) for n in ("fp", NOISE_ROW))
    shift = 0.2 * abs(noise["fd_real"] - fp["fd_real"])

    def on_other_gpu(part):
        p = json.loads(json.dumps(part))
        for r in p["rows"]:
            if r["preset"] == "fp":
                r["fd_real"] += shift
        return p
    with pytest.raises(ValueError, match="FP rows differ.*--fp_sets"):
        ablation.merge([brecq, on_other_gpu(base)], values=values)
    def other_values(v):                                      # its FP samples: other features
        out = {k: dict(m) for k, m in v.items()}
        est, reps = out["fp"]["fd_real"]
        out["fp"]["fd_real"] = (est + shift, reps + shift)
        return out
    parts = [brecq, on_other_gpu(base), on_other_gpu(brecq)]
    merged = ablation.merge(parts, values=[values[0], other_values(values[1]), other_values(values[0])],
                            method_order=cli.METHODS, fp_sets=True)
    assert [(r["name"], r["fp_set"]) for r in merged["rows"]] == [
        ("fp", 0), (NOISE_ROW, 0), ("fp@2", 1), (f"{NOISE_ROW}@2", 1),
        ("w4a6_baseline", 1), ("w4a6_brecq", 0), ("w4a6_brecq@2", 1)]
    assert [p["fp_set"] for p in merged["parts"]] == [0, 1, 1]
    assert merged["rows"][0]["fd_real"] == pytest.approx(fp["fd_real"])             # each set's own FP values
    assert merged["rows"][2]["fd_real"] == pytest.approx(fp["fd_real"] + shift)
    assert {"fp@2", f"{NOISE_ROW}@2", "w4a6_brecq@2"} <= set(merged["_values"])
    against = {c["b"]: c["a"] for c in merged["comparisons"] if c["what"] == "against FP"}
    assert against == {"w4a6_baseline": "fp@2", "w4a6_brecq": "fp", "w4a6_brecq@2": "fp@2"}
    pairs = {(c["a"], c["b"], c["fp_set"]) for c in merged["comparisons"] if c["what"] != "against FP"}
    assert pairs == {("w4a6_baseline", "w4a6_brecq@2", 1)}  # set 1's brecq is not paired with set 2's baseline
    c = next(c for c in merged["comparisons"] if c["b"] == "w4a6_brecq@2" and c["metric"] == "class_accuracy"
             and c["what"] != "against FP")
    one = next(c for c in result["comparisons"] if c["b"] == "w4a6_brecq" and c["metric"] == "class_accuracy"
               and c["what"] != "against FP")
    assert c["estimate"] == pytest.approx(one["estimate"]) and c["low"] == pytest.approx(one["low"])
    assert any("form 2 FP sets" in n for n in merged["eval_notes"])
    assert any("run w4a6_brecq: quantized again by part 2 in FP set 2" in n and "class_accuracy +0 [+0, +0]" in n
               for n in merged["eval_notes"])
    results_table.write(str(tmp_path / "SETS.md"), merged)
    md = (tmp_path / "SETS.md").read_text()
    assert "| FP set |" in md and "Noise floor of FP set 2" in md and "FP set 2, reconstruction" in md
    assert not any(f.startswith("Not compared") for f in merged["findings"])
    alone = ablation.merge(parts[:2], values=[values[0], other_values(values[1])], method_order=cli.METHODS,
                           fp_sets=True)                     # without brecq@2: the pair lies in no common set
    assert not [c for c in alone["comparisons"] if c["what"] != "against FP"]
    assert [f for f in alone["findings"] if f.startswith("Not compared")] == [
        "Not compared: W4A6, calib seed 2025, reconstruction (baseline → brecq): baseline is in FP set 2, brecq in "
        "FP set 1, and rows of different FP sets are not paired (running baseline again in brecq's FP set would "
        "give the comparison)."]


def test_a_part_of_the_table_runs_only_the_named_runs(ablation_run):
    root, result, _ = ablation_run
    logs = []
    part = _ablate(root, out="R5.md", only=["w4a6_brecq"], log=logs.append)   # resumed: nothing is recomputed
    assert [r["name"] for r in part["rows"]] == ["fp", NOISE_ROW, "w4a6_brecq"]
    assert part["rows"][2] == next(r for r in result["rows"] if r["name"] == "w4a6_brecq")
    assert not any("w4a6_baseline" in s for s in logs)
    with pytest.raises(ValueError, match="'w4a6_full' is not a run of this table"):
        _ablate(root, out="R6.md", only=["w4a6_full"])
    assert not (root / "R6.md").exists()


def test_a_stop_signal_writes_the_finished_runs(ablation_run):
    """`timeout`'s SIGTERM at the end of a device lease: the table of the runs finished before it is written (a
    second signal while writing is ignored), the rest listed as not run, and the part merges with the rest."""
    root, result, _ = ablation_run
    before = signal.getsignal(signal.SIGTERM)

    def stop(at):
        def log(line):
            if line.startswith(at):
                os.kill(os.getpid(), signal.SIGTERM)
        return log

    part = _ablate(root, out="R8.md", log=stop(("=== 2/2", "[bootstrap]")), stop_on=(signal.SIGTERM,))
    assert signal.getsignal(signal.SIGTERM) is before
    assert [r["name"] for r in part["rows"]] == ["fp", NOISE_ROW, "w4a6_baseline"]
    assert part["rows"] == [r for r in result["rows"] if r["name"] != "w4a6_brecq"]
    saved = json.load(open(root / "R8.json"))
    assert saved["stopped"] == "SIGTERM" and saved["not_run"] == ["w4a6_brecq"]
    assert "**Stopped by SIGTERM**" in (root / "R8.md").read_text()
    (brecq, _), (brecq_values, _) = _split(result)
    merged = ablation.merge([saved, brecq], values=[part["_values"], brecq_values], method_order=cli.METHODS)
    assert merged["rows"] == result["rows"] and merged["comparisons"] == result["comparisons"]
    assert merged["parts"][0]["stopped"] == "SIGTERM"
    with pytest.raises(stopping.Stopped, match="during the FP rows"):
        _ablate(root, out="R9.md", log=stop("[fp] evaluation"), stop_on=(signal.SIGTERM,))
    assert not (root / "R9.md").exists() and signal.getsignal(signal.SIGTERM) is before
