"""Evaluation: metrics wiring (checked against direct computations), kept-region PSNR/SSIM, zero-shot tasks, bad
input, the CLI (single checkpoint and a sweep with a quantized checkpoint), and the default model end to end.

Feature networks here are test fixtures: a fixed random projection standing in for Inception (low-dimensional:
a 2048-dim Fréchet distance takes ~40 s on a 2-core CPU) and a random-weight classifier whose export claims
training. Their numbers only check the plumbing against direct computations; none is a quality result.
"""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from test_generate import FAST, random_like, small_model
from varq_jax import checkpoint, editing, parallel
from varq_jax.data import shapes
from varq_jax.eval import evaluate as ev
from varq_jax.eval import features as feature_nets
from varq_jax.eval import zero_shot
from varq_jax.eval import generate as G
from varq_jax.eval import metrics
from varq_jax.models import classifier as clf
from varq_jax.quant import export as qexport, state as qstate
from varq_jax.quant.policy import QuantPolicy
from varq_jax.train import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, SIZE = 21, 16
CONFIG = ev.EvalConfig(num_images=N, per_device_batch=2, shard_size=2, feature_batch=2, dtype="float32",
                       top_k=16, compiler_options=tuple(FAST.items()))   # = test_generate's generation settings
CLF_CFG = clf.ClassifierConfig(num_classes=10, widths=(8, 16), feature_dim=8, groups=8)


def fake_inception(variables, images):
    """Stand-in for Inception: 4×4 average pooling, then fixed random projections (16 / 12 / 10 dims)."""
    x = images.astype(jnp.float32).reshape(images.shape[0], 4, 4, 4, 4, 3).mean((2, 4)).reshape(images.shape[0], -1)
    x = x / 255.0
    return {"pool": jnp.tanh(x @ variables["pool"]), "spatial": jnp.tanh(x @ variables["spatial"]),
            "logits": 4 * x @ variables["logits"]}


def fake_inception_net() -> feature_nets.FeatureNet:
    rng = np.random.default_rng(1)
    variables = {k: rng.standard_normal((48, d)).astype(np.float32) for k, d in (("pool", 16), ("spatial", 12),
                                                                                 ("logits", 10))}
    return feature_nets.FeatureNet("inception", fake_inception, variables, None, "fake-inception")


def _write_npz(path, images, **extra):
    np.savez(path, arr_0=images, **extra)
    return str(path)


def _shapes(start, n):
    """Test-split shapes images start..start+n, rendered in the 256-image chunks evaluate uses (one compilation)."""
    assert n <= 256
    return np.asarray(shapes.make_batch_uint8(0, np.arange(start, start + 256), split="test", image_size=SIZE)[0])[:n]


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh()


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    params = random_like(jax.eval_shape(lambda: clf.init_params(CLF_CFG, jax.random.PRNGKey(3), SIZE)))
    d = tmp_path_factory.mktemp("clf") / "classifier"
    export.save(str(d), params, kind="classifier", config=CLF_CFG,
                meta={"steps": 1, "eval": {"acc": 1.0}})      # a plumbing fixture: random weights, claimed trained
    return str(d)


# --- kept-region PSNR / SSIM ------------------------------------------------------------------------------------
def _reference_ssim_map(a, b):
    """Independent SSIM map: scipy Gaussian correlation per channel with mirrored borders."""
    x = np.arange(11) - 5
    w = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    w /= w.sum()

    def filt(z):
        return ndimage.correlate1d(ndimage.correlate1d(z, w, axis=0, mode="reflect"), w, axis=1, mode="reflect")
    out = []
    for c in range(a.shape[-1]):
        p, q = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        mp, mq = filt(p), filt(q)
        vp, vq, cpq = filt(p * p) - mp ** 2, filt(q * q) - mq ** 2, filt(p * q) - mp * mq
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        out.append((2 * mp * mq + c1) * (2 * cpq + c2) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)))
    return np.mean(out, axis=0)


def test_masked_psnr_and_ssim_match_direct_formulas():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((2, 24, 24))
    mask[0, :, :12] = 1
    mask[1, 6:20, 3:21] = 1
    for i in range(2):
        sel = mask[i] > 0
        mse = np.mean((a[i][sel].astype(float) - b[i][sel]) ** 2)
        np.testing.assert_allclose(zero_shot.masked_psnr(a, b, mask)[i], 10 * np.log10(255 ** 2 / mse), rtol=1e-12)
        ref = _reference_ssim_map(a[i], b[i])
        np.testing.assert_allclose(zero_shot.masked_ssim(a, b, mask)[i], ref[sel].mean(), rtol=1e-4)


def test_changes_inside_the_box_do_not_touch_the_kept_region():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 12:20, 12:20] = 255 - b[0, 12:20, 12:20]
    far = np.ones((1, 32, 32))
    far[0, 12 - 5:20 + 5, 12 - 5:20 + 5] = 0       # kept pixels whose SSIM window misses the box
    assert zero_shot.masked_psnr(a, b, far)[0] == zero_shot.PSNR_CAP_DB
    np.testing.assert_allclose(zero_shot.masked_ssim(a, b, far)[0], 1.0, rtol=1e-6)
    inside = 1 - far
    assert zero_shot.masked_psnr(a, b, inside)[0] < 20 and zero_shot.masked_ssim(a, b, inside)[0] < 0.9
    with pytest.raises(ValueError, match="do not match"):
        zero_shot.masked_psnr(a, b, far[:, :16])


# --- metrics -------------------------------------------------------------------------------------------------------
def test_metrics_match_direct_computation(model, mesh, classifier_dir, tmp_path):
    ref_images = _shapes(100, 24)
    stats_src = fake_inception(fake_inception_net().variables, jnp.asarray(_shapes(400, 30)))
    pool_stats = metrics.feature_stats(np.asarray(stats_src["pool"]))          # "precomputed": of other images
    spatial_stats = metrics.feature_stats(np.asarray(stats_src["spatial"]))
    ref_path = _write_npz(tmp_path / "ref.npz", ref_images)
    other = _write_npz(tmp_path / "other.npz", _shapes(200, 18), arr_1=np.arange(18) % 10)
    res = ev.Resources(inception=fake_inception_net(), classifier=feature_nets.load_classifier(classifier_dir),
                       ref_batch=metrics.ReferenceBatch(ref_path, 24, (SIZE, SIZE), pool_stats, spatial_stats),
                       ref_samples=metrics.load_reference_batch(other))
    cfg = dataclasses.replace(CONFIG, ref_batch=ref_path, ref_samples=other)
    out = tmp_path / "eval"
    results = ev.evaluate("test-model", str(out), cfg, mesh=mesh, resources=res, model=model, log=lambda s: None)

    samples, labels = G.load_samples(str(out / G.SAMPLES))
    np.testing.assert_array_equal(labels, np.arange(N) % 10)
    feat = lambda x: {k: np.asarray(v) for k, v in fake_inception(res.inception.variables, jnp.asarray(x)).items()}
    s, r, o = feat(samples), feat(ref_images), feat(_shapes(200, 18))
    want = {"inception_score": metrics.inception_score(s["logits"]),
            "fid": metrics.frechet_distance(metrics.feature_stats(s["pool"]), pool_stats),        # the given stats
            "sfid": metrics.frechet_distance(metrics.feature_stats(s["spatial"]), spatial_stats),
            "fid_vs_ref_samples": metrics.frechet_distance(s["pool"], o["pool"]),
            "sfid_vs_ref_samples": metrics.frechet_distance(s["spatial"], o["spatial"])}
    want["precision"], want["recall"] = metrics.precision_recall(r["pool"], s["pool"])
    want["precision_vs_ref_samples"], want["recall_vs_ref_samples"] = metrics.precision_recall(o["pool"], s["pool"])
    params = export.as_float32(export.load(classifier_dir)[0])
    logits, features = clf.apply_batched(CLF_CFG, params, samples)
    want["class_accuracy"] = float(np.mean(logits.argmax(-1) == labels))
    want["fd_classifier_real"] = metrics.frechet_distance(
        features, clf.extract_features(CLF_CFG, params, _shapes(0, N)))
    want["fd_classifier_vs_ref_samples"] = metrics.frechet_distance(
        features, clf.extract_features(CLF_CFG, params, _shapes(200, 18)))
    got = results["metrics"]
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-4, atol=1e-6, err_msg=k)
    assert got["fid"] != pytest.approx(metrics.frechet_distance(s["pool"], r["pool"]), rel=1e-3)
    on_disk = json.load(open(out / ev.RESULTS))
    assert on_disk["metrics"] == pytest.approx(got) and on_disk["random_weights"]
    lines = ev.metric_lines(results)
    assert lines[0].startswith("NOTE: the model is RANDOM-WEIGHT")
    assert any(line.startswith("fid: ") for line in lines)
    assert any(line.startswith("class_accuracy: ") for line in lines)


# --- zero-shot ---------------------------------------------------------------------------------------------------
def test_zero_shot_tasks(model, mesh, classifier_dir, tmp_path):
    inputs = _shapes(300, 5)
    path = _write_npz(tmp_path / "inputs.npz", inputs, labels=np.arange(5) % 10, target_labels=np.full(5, 3))
    cfg = dataclasses.replace(CONFIG, zero_shot=path)
    res = ev.Resources(classifier=feature_nets.load_classifier(classifier_dir))
    out = tmp_path / "zs"
    results = zero_shot.evaluate_zero_shot(model, str(out), cfg, res, mesh, log=lambda s: None)
    assert set(results) == set(editing.TASKS)
    params = export.as_float32(export.load(classifier_dir)[0])
    for task in editing.TASKS:
        images, labels = G.load_samples(str(out / task / G.SAMPLES))
        assert images.shape == inputs.shape
        np.testing.assert_array_equal(labels, np.full(5, 3 if task == "edit" else 10))   # target / unconditional
        tokens_kept = editing.box_keep_mask(4, (0.25, 0.25, 0.75, 0.75), task)
        assert tokens_kept.sum() == (4 if task == "outpaint" else 12)
        kept = np.kron(tokens_kept, np.ones((4, 4))) > 0
        psnr = [10 * np.log10(255 ** 2 / np.mean((images[i][kept].astype(float) - inputs[i][kept]) ** 2))
                for i in range(5)]
        np.testing.assert_allclose(results[task]["psnr_kept"], np.mean(psnr), rtol=1e-9)
        assert -1 <= results[task]["ssim_kept"] <= 1
        logits, features = clf.apply_batched(CLF_CFG, params, images)
        want_fd = metrics.frechet_distance(features, clf.extract_features(CLF_CFG, params, inputs))
        np.testing.assert_allclose(results[task]["fd_classifier_vs_inputs"], want_fd, rtol=2e-4, atol=1e-6)
        target = np.full(5, 3) if task == "edit" else np.arange(5) % 10
        assert results[task]["class_accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == target))


# --- bad input -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "garbage.npz").write_bytes(b"this is not a zip file")
    _write_npz(d / "small.npz", np.zeros((4, 8, 8, 3), np.uint8))
    _write_npz(d / "ok.npz", np.zeros((4, SIZE, SIZE, 3), np.uint8))
    _write_npz(d / "boxes.npz", np.zeros((2, SIZE, SIZE, 3), np.uint8),
               boxes=np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 0.4, 1]]))
    untrained = d / "untrained"
    shapes_only = jax.eval_shape(lambda: clf.init_params(CLF_CFG, jax.random.PRNGKey(0), SIZE))
    export.save(str(untrained), random_like(shapes_only), kind="classifier", config=CLF_CFG, meta={"steps": 0})
    return d


@pytest.mark.parametrize("field, value, message", [
    ("ref_batch", "garbage.npz", "cannot read reference batch"),
    ("ref_batch", "ok.npz", r"--ref_batch needs Inception weights"),
    ("ref_samples", "small.npz", r"--ref_samples .* holds 8x8 images, the model makes 16x16"),
    ("ref_samples", "missing.npz", "--ref_samples: cannot read reference batch"),
    ("inception", "missing_dir", "no Inception checkpoint directory"),
    ("classifier", "untrained", "does not look trained"),
    ("zero_shot", "small.npz", "zero-shot images are 8x8, the model makes 16x16"),
    ("zero_shot", "boxes.npz", r"box \(y0, x0, y1, x1\) = .* must satisfy"),
    ("dtype", "float16", "dtype must be one of"),
])
def test_bad_input_fails_before_generation(model, mesh, inputs_dir, tmp_path, field, value, message):
    value = str(inputs_dir / value) if field not in ("dtype",) else value
    cfg = dataclasses.replace(CONFIG, **{field: value})
    with pytest.raises(ValueError, match=message):
        ev.evaluate(None, str(tmp_path / "out"), cfg, mesh=mesh, model=model, log=lambda s: None)
    assert not os.path.exists(tmp_path / "out" / G.MANIFEST)


# --- the CLI -------------------------------------------------------------------------------------------------------
def _save_checkpoints(model, tmp_path):
    fp = checkpoint.save(str(tmp_path / "fp"), model.vae_cfg, model.var_cfg, model.params, meta=model.meta)
    policy = QuantPolicy(w_bits=8, a_bits=8)
    quant = qstate.init_quant_state(model.params["var"], policy)
    w8a8 = qexport.save_quantized(str(tmp_path / "w8a8"), model, model.params["var"], quant, policy, meta=model.meta)
    return fp, w8a8


def _run_cli(argv):
    """experiments.evaluate in this process, with the CLIs' convention (a user error: SystemExit 'error: …')."""
    from absl import flags
    from experiments import evaluate as cli
    from varq_jax.cli import USER_ERRORS
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:   # overrides registered by an earlier call
        delattr(flags.FLAGS, name)
    argv = ["evaluate", f"--config={cli.SETTINGS}", *argv]
    saved, sys.argv = sys.argv, argv            # config_flags reads its --config.* overrides from sys.argv
    try:
        flags.FLAGS(argv)
        cli.main(argv[:1])
    except USER_ERRORS as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        sys.argv = saved
        flags.FLAGS.unparse_flags()


CLI_SMALL = [f"--config.num_images={N}", "--per_device_batch=2", "--config.shard_size=2", "--feature_batch=2",
             "--dtype=float32", "--config.top_k=16", "--xla_options=xla_backend_optimization_level=0"]


def test_cli_single_checkpoint_and_sweep(model, classifier_dir, tmp_path, capsys):
    fp, w8a8 = _save_checkpoints(model, tmp_path)
    _run_cli([f"--checkpoint={fp}", f"--out={tmp_path / 'one'}", *CLI_SMALL])
    printed = capsys.readouterr().out
    assert "NOTE: the model is RANDOM-WEIGHT" in printed and "NOTE: no Inception weights given" in printed
    assert "NOTE: no embedded classifier" in printed and "fits a 10-class 16px model" in printed
    for f in (G.SAMPLES, G.GRID, ev.RESULTS, G.MANIFEST):
        assert os.path.exists(tmp_path / "one" / f), f

    _run_cli([f"--checkpoints={fp},{w8a8}", "--fid_to_first", f"--classifier={classifier_dir}",
              f"--out={tmp_path / 'sweep'}", *CLI_SMALL])
    printed = capsys.readouterr().out
    rows = json.load(open(tmp_path / "sweep" / "sweep.json"))
    assert [r["quantization"] for r in rows] == [None, {"w_bits": 8, "a_bits": 8, "shift_and_sum": True, "rules": []}]
    assert "fd_classifier_vs_ref_samples" not in rows[0] and "fd_classifier_vs_ref_samples" in rows[1]
    fp_samples, _ = G.load_samples(str(tmp_path / "sweep" / "00_fp" / G.SAMPLES))
    q_samples, _ = G.load_samples(str(tmp_path / "sweep" / "01_w8a8" / G.SAMPLES))
    np.testing.assert_array_equal(fp_samples, G.load_samples(str(tmp_path / "one" / G.SAMPLES))[0])
    params = export.as_float32(export.load(classifier_dir)[0])
    want = metrics.frechet_distance(clf.extract_features(CLF_CFG, params, q_samples),
                                    clf.extract_features(CLF_CFG, params, fp_samples))
    np.testing.assert_allclose(rows[1]["fd_classifier_vs_ref_samples"], want, rtol=2e-4, atol=1e-6)
    table = open(tmp_path / "sweep" / "sweep.md").read()
    assert table.count("\n") == 4 and "| W8A8 SaS |" in table and "fd_classifier_real" in table.splitlines()[0]
    assert table in printed


def test_cli_bad_input_is_a_clean_error(tmp_path):
    with pytest.raises(SystemExit, match="error: checkpoint directory .* does not exist"):
        _run_cli([f"--checkpoint={tmp_path / 'missing'}", f"--out={tmp_path / 'out'}"])
    with pytest.raises(SystemExit, match="error: checkpoint directory .* does not exist"):
        _run_cli([f"--checkpoints=default,{tmp_path / 'missing'}", f"--out={tmp_path / 'out'}"])
    assert not os.path.exists(tmp_path / "out")


def test_cli_on_the_default_model_end_to_end(tmp_path):
    """The shipped default model through the CLI: samples, and the in-project metrics with the embedded classifier."""
    cmd = [sys.executable, "-m", "experiments.evaluate", f"--out={tmp_path / 'default'}", "--config.num_images=10",
           "--per_device_batch=2", "--xla_options=xla_backend_optimization_level=0"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RANDOM-WEIGHT" not in r.stdout and "class_accuracy" in r.stdout
    images, labels = G.load_samples(str(tmp_path / "default" / G.SAMPLES))
    assert images.shape == (10, 64, 64, 3) and list(labels) == list(np.arange(10))
    results = json.load(open(tmp_path / "default" / ev.RESULTS))
    assert results["checkpoint"] == "default" and not results["random_weights"] and results["samples"]["devices"] == 8
    assert 0 <= results["metrics"]["class_accuracy"] <= 1


@pytest.mark.slow      # the real InceptionV3 compiles twice (~1 min on CPU); the fake-network test covers the wiring
def test_real_inception_features_sharded_equal_unsharded(mesh, tmp_path):
    from varq_jax.eval import convert_inception, inception
    variables = jax.jit(inception.init_variables)(jax.random.PRNGKey(0))
    net = feature_nets.load_inception(convert_inception.save_variables(variables, str(tmp_path / "inception")))
    images = _shapes(0, 8)
    got = feature_nets.extract_features(net, images, mesh, 1)
    want = inception.InceptionV3().apply(variables, jnp.asarray(images))
    for name in ("pool", "spatial", "logits"):
        np.testing.assert_allclose(got[name], np.asarray(getattr(want, name)), rtol=1e-4, atol=1e-5, err_msg=name)
