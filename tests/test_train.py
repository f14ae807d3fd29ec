"""Training of the embedded default model at toy size on the CPU: the quantizer's training forward against the
official semantics, losses that fall, class-label dropout, exports, and runs that resume from checkpoints."""
import copy
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.train_default import get_config
from varq_jax.data import shapes
from varq_jax.models import classifier as clf
from varq_jax.models.vqvae import VQVAE
from varq_jax.train import classifier as clf_stage
from varq_jax.train import export, loop, optim
from varq_jax.train import var as var_stage
from varq_jax.train import vqvae as vqvae_stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA's backend optimiser off, as in the toy config: the programs here are tiny and compiling dominates.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def toy(steps: int = 12, lr: float = None):
    c = get_config("toy")
    for stage in (c.vqvae, c.var, c.classifier):
        stage.num_steps = steps
        if lr:
            stage.optim.lr = lr
    return c


def _tree_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


@functools.lru_cache(maxsize=None)
def _toy_vqvae():
    """A randomly initialised toy VQVAE (module, params): tokens need not be good to train on them."""
    c = toy()
    cfg = vqvae_stage.model_config(c)
    img = jnp.zeros((1, c.image_size, c.image_size, 3))
    return VQVAE(cfg), fast_jit(VQVAE(cfg).init)(jax.random.key(0), img)["params"]


# --- the quantizer's training forward ------------------------------------------------------------------------
def test_quantize_train_matches_tokenize_and_has_the_official_gradients():
    model, params = _toy_vqvae()
    cfg = model.cfg
    rng = np.random.default_rng(0)
    params = {**params, "embedding": 0.5 * rng.standard_normal(params["embedding"].shape, np.float32)}
    f = rng.standard_normal((2, cfg.patch_nums[-1], cfg.patch_nums[-1], cfg.z_channels), np.float32)

    def train_fwd(p, f):
        return model.apply({"params": p}, f, method=VQVAE.quantize_train)

    def reference_loss(p, idx_ref):
        """mean over scales of MSE(f̂_k, f) with f̂_k rebuilt from fixed tokens: what moves codebook and Phi."""
        def cumulative(m, f):
            f_hat, total = 0.0, 0.0
            for si, idx in enumerate(idx_ref):
                pn = cfg.patch_nums[si]
                f_hat = f_hat + m._upsample_phi(si, m.embed(idx.reshape(idx.shape[0], pn, pn)))
                total = total + jnp.mean(jnp.square(f_hat - f))
            return total / len(idx_ref)
        return model.apply({"params": p}, f, method=cumulative)

    @fast_jit
    def everything(p, f, cotangent):
        f_hat, vq_loss, idx_list, inputs = train_fwd(p, f)
        idx_ref, fhat_ref = model.apply({"params": p}, f, method=VQVAE.tokenize)
        grad_f = jax.grad(lambda f: train_fwd(p, f)[1])(f)
        st_f = jax.vjp(lambda f: train_fwd(p, f)[0], f)[1](cotangent)[0]
        grad_p = jax.grad(lambda p: train_fwd(p, f)[1])(p)
        grad_p_ref = jax.grad(reference_loss)(p, idx_ref)
        st_p = jax.grad(lambda p: jnp.sum(train_fwd(p, f)[0] * cotangent))(p)
        return f_hat, vq_loss, idx_list, inputs, idx_ref, fhat_ref, grad_f, st_f, grad_p, grad_p_ref, st_p

    cotangent = rng.standard_normal(f.shape, np.float32)
    (f_hat, vq_loss, idx_list, inputs, idx_ref, fhat_ref, grad_f, st_f, grad_p, grad_p_ref,
     st_p) = everything(params, f, cotangent)
    for a, b in zip(idx_list, idx_ref):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(f_hat, fhat_ref[-1], atol=1e-5)
    assert [z.shape[1] for z in inputs] == list(cfg.patch_nums)
    mse = [np.mean(np.square(np.asarray(fh) - f)) for fh in fhat_ref]
    np.testing.assert_allclose(vq_loss, (1 + cfg.beta) * np.mean(mse), rtol=1e-5)
    # encoder side: d loss / d f = mean over scales of β·2(f − f̂_k)/n; f̂ passes gradients straight through
    expected = np.mean([cfg.beta * 2 * (f - np.asarray(fh)) / f.size for fh in fhat_ref], axis=0)
    np.testing.assert_allclose(grad_f, expected, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(st_f, cotangent, rtol=1e-6)
    # codebook/Phi side: only MSE(f̂_k, sg(f)) moves them, and the straight-through output does not
    for key in ["embedding"] + [k for k in params if k.startswith("phi_")]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8), grad_p[key],
                     grad_p_ref[key])
    assert np.abs(np.asarray(grad_p["embedding"])).max() > 0
    assert np.abs(np.asarray(st_p["embedding"])).max() == 0.0


# --- each stage's loss falls ---------------------------------------------------------------------------------------
def _run_steps(step_fn, state, n):
    losses, metrics = [], []
    for _ in range(n):
        state, m = step_fn(state)
        losses.append(float(m["loss"]))
        metrics.append(jax.device_get(m))
    return state, np.array(losses), metrics


def test_vqvae_steps_lower_the_loss_and_step_zero_seeds_the_codebook_from_the_encoder():
    c = toy(steps=16, lr=3e-3)
    model, params = _toy_vqvae()
    tx = optim.make_optimizer(c.vqvae.optim, c.vqvae.num_steps)
    abstract = jax.eval_shape(lambda: vqvae_stage.init_state(c, model, tx))
    state = loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=fast_jit(tx.init)(params),
                            extra={"usage": jnp.zeros((model.cfg.vocab_size,))})
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    initial_codes = np.asarray(state.params["embedding"])
    state, losses, metrics = _run_steps(vqvae_stage.make_train_step(c, model, tx), state, 16)
    assert metrics[0]["reinit"] == model.cfg.vocab_size    # usage starts at 0: every code comes from data
    assert np.asarray(state.params["embedding"]).std(0).mean() > 20 * initial_codes.std(0).mean()
    assert losses[-3:].mean() < 0.8 * losses[:2].mean(), losses
    assert int(state.step) == 16


def test_dead_codes_are_replaced_by_quantizer_inputs():
    embedding = jnp.arange(12.0).reshape(4, 3)
    usage = jnp.array([0.5, 0.0, 0.25, 0.001])
    inputs = -jnp.arange(30.0).reshape(10, 3)
    new, new_usage, count = vqvae_stage.reinit_dead_codes(embedding, usage, inputs, jax.random.key(0), 0.05)
    assert int(count) == 2                                  # threshold 0.05 / 4 codes: codes 1 and 3 are dead
    new = np.asarray(new)
    np.testing.assert_array_equal(new[[0, 2]], np.asarray(embedding)[[0, 2]])
    for row in new[[1, 3]]:
        assert any(np.array_equal(row, x) for x in np.asarray(inputs))
    np.testing.assert_allclose(new_usage, [0.5, 0.25, 0.25, 0.25])


def test_vqvae_evaluation_measures_the_full_token_pyramid_reconstruction():
    c = toy()
    c.vqvae.batch_size = 8
    model, params = _toy_vqvae()
    metrics = vqvae_stage.evaluate(c, model.cfg, params, 16, jnp.float32)
    images, _ = shapes.make_batch(c.seed, np.arange(16), split="test", image_size=c.image_size)
    recon = fast_jit(lambda p, x: model.apply({"params": p}, x))(params, images)
    np.testing.assert_allclose(metrics["mse"], np.mean(np.square(np.asarray(recon) - np.asarray(images))),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["psnr"], 10 * np.log10(4 / metrics["mse"]), rtol=1e-6)
    assert metrics["eval_images"] == 16 and len(metrics["codes_used_per_scale"]) == len(c.patch_nums)
    assert 1 <= round(metrics["codes_used_per_scale"][0] * c.vocab_size) <= 16    # one token per image at scale 0
    assert 0 < metrics["codes_used"] <= 1


def _saved_toy_vqvae(workdir):
    model, params = _toy_vqvae()
    export.save(os.path.join(workdir, "vqvae", "export"), export.cast_kernels(params, export.vqvae_keeps_float32),
                kind="vqvae", config=model.cfg)


def test_var_stage_lowers_the_loss_label_dropout_one_trains_only_the_null_class_and_exports(tmp_path):
    """The VAR stage end to end on an exported toy tokenizer. With cond_drop_rate 1 every label is replaced by
    the null class, so the other class embeddings receive no gradient (and no weight decay here)."""
    c = toy(steps=16, lr=3e-3)
    c.train_images = 2 * c.var.batch_size                  # a small fixed set: the loss must fall within 16 steps
    c.var.cond_drop_rate = 1.0
    c.var.optim.weight_decay = 0.0
    _saved_toy_vqvae(str(tmp_path))
    path = var_stage.train_and_export(c, str(tmp_path))
    params, info = export.load(path, kind="var")
    assert info["meta"]["steps"] == 16 and info["config"]["num_classes"] == 10
    assert 0 < info["meta"]["eval"]["ce"] < np.log(c.vocab_size) + 0.5
    assert len(info["meta"]["eval"]["acc_per_scale"]) == len(c.patch_nums)
    with open(tmp_path / "var" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.1, logged

    cfg = var_stage.model_config(c)
    tx = optim.make_optimizer(c.var.optim, c.var.num_steps)
    initial = fast_jit(lambda: var_stage.init_state(c, cfg, tx))().params["class_emb"]   # as the stage compiles it
    np.testing.assert_array_equal(params["class_emb"][:cfg.num_classes], initial[:cfg.num_classes])
    assert np.abs(params["class_emb"][cfg.num_classes] - initial[cfg.num_classes]).max() > 0
    kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(params) if p[-1].key == "kernel"]
    assert kernels and all(k.dtype == jnp.bfloat16 for k in kernels)
    assert params["class_emb"].dtype == np.float32


def test_var_stage_refuses_a_tokenizer_trained_with_another_config(tmp_path):
    c = toy()
    _saved_toy_vqvae(str(tmp_path))
    c.vqvae.model.num_res_blocks = 2
    with pytest.raises(ValueError, match="differs"):
        var_stage.load_tokenizer(c, str(tmp_path))


def test_var_init_follows_the_official_scheme():
    c = get_config()                                          # vocab 512: the head's statistics are meaningful
    c.var.model.update(depth=2, width=128, heads=2)
    cfg = var_stage.model_config(c)
    params = fast_jit(lambda: var_stage.init_params(cfg, jax.random.key(0), c.var.init))()
    std = (1 / cfg.width / 3) ** 0.5
    np.testing.assert_allclose(np.std(params["blocks_0"]["ffn"]["fc1"]["kernel"]), std, rtol=0.02)
    np.testing.assert_allclose(np.std(params["blocks_0"]["ffn"]["fc2"]["kernel"]),
                               std / np.sqrt(2 * cfg.depth), rtol=0.02)
    np.testing.assert_allclose(np.std(params["head"]["kernel"]), 0.02 * std, rtol=0.02)
    ada = np.asarray(params["blocks_0"]["ada_lin"]["kernel"])
    np.testing.assert_allclose(np.std(ada[:, :2 * cfg.width]), 1e-5 * std, rtol=0.02)
    np.testing.assert_allclose(np.std(ada[:, 2 * cfg.width:]), 0.5 * std, rtol=0.02)
    assert all(float(jnp.abs(b).max()) == 0 for p, b in jax.tree_util.tree_leaves_with_path(params)
               if p[-1].key == "bias")


@functools.lru_cache(maxsize=None)
def _toy_classifier_stage():
    """(config, model config, init, jitted step) of the toy classifier stage on one fixed batch, shared by
    the tests below so the step compiles once."""
    c = toy(steps=16, lr=1e-2)
    c.train_images = c.classifier.batch_size               # one fixed batch: the loss must fall within 16 steps
    cfg = clf_stage.model_config(c)
    tx = optim.make_optimizer(c.classifier.optim, c.classifier.num_steps)
    return c, cfg, functools.partial(clf_stage.init_state, c, cfg, tx), clf_stage.make_train_step(c, cfg, tx)


def test_classifier_steps_lower_the_loss_and_the_metric_functions_agree():
    c, cfg, init, step = _toy_classifier_stage()
    state = fast_jit(init)()
    state, losses, _ = _run_steps(step, state, 16)
    assert losses[-4:].mean() < losses[:2].mean() - 0.05, losses

    images, labels = shapes.make_batch_uint8(0, np.arange(10), split="test", image_size=c.image_size)
    images, labels = np.asarray(images), np.asarray(labels)
    feats = clf.extract_features(cfg, state.params, images, batch_size=4)       # batches 4 + 4 + 2 (padded)
    assert feats.shape == (10, cfg.feature_dim) and feats.dtype == np.float32
    logits, one_batch = clf._apply(cfg, state.params, images / 127.5 - 1)
    np.testing.assert_allclose(feats, one_batch, rtol=1e-5, atol=1e-6)
    acc = clf.class_accuracy(cfg, state.params, images, labels, batch_size=4)
    assert acc == np.mean(np.asarray(logits).argmax(-1) == labels)
    with pytest.raises(ValueError, match="labels"):
        clf.class_accuracy(cfg, state.params, images, labels[:5])
    with pytest.raises(ValueError, match="NHWC"):
        clf.extract_features(cfg, state.params, images[..., 0])


# --- resuming --------------------------------------------------------------------------------------------------
def test_loop_continues_from_its_checkpoint_instead_of_restarting(tmp_path):
    """A run stopped at step 5 restores step and params and executes only the remaining steps."""
    def init():
        return loop.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.ones(3)}, opt_state={},
                               extra={"seen": jnp.zeros((), jnp.int32)})

    calls = []

    @jax.jit
    def step_fn(state):
        w = state.params["w"] * 0.9 + state.step.astype(jnp.float32)
        return loop.TrainState(state.step + 1, {"w": w}, {}, {"seen": state.extra["seen"] + 1}), {"loss": w.sum()}

    def counted(state):
        calls.append(int(state.step))
        return step_fn(state)

    kw = dict(name="t", init_state=init, train_step=counted, num_steps=9, items_per_step=1, log_every=2,
              ckpt_every=3)
    first = loop.run(ckpt_dir=str(tmp_path / "a"), stop_at=5, **kw)
    assert int(first.step) == 5 and calls == [0, 1, 2, 3, 4]
    restored = loop.restore_or_init(loop.checkpoint_manager(str(tmp_path / "a")), init)
    assert int(restored.step) == 5 and _tree_equal(restored, first)
    calls.clear()
    resumed = loop.run(ckpt_dir=str(tmp_path / "a"), **kw)
    assert calls == [5, 6, 7, 8] and int(resumed.step) == 9 and int(resumed.extra["seen"]) == 9
    straight = loop.run(ckpt_dir=str(tmp_path / "b"), **kw)
    assert _tree_equal(straight, resumed)


def test_stage_interrupted_and_resumed_equals_an_uninterrupted_run(tmp_path):
    """The classifier stage's real step: same data order and random numbers after a restart, so the resumed
    run ends bit-identical to an uninterrupted one, and no step is trained twice."""
    c, _, init, step = _toy_classifier_stage()             # one compilation shared by the three runs
    c = copy.deepcopy(c)
    c.stop_at_step = 8
    assert loop.run_stage(c, str(tmp_path / "a"), "classifier", c.classifier, init, step) is None
    assert loop.checkpoint_manager(str(tmp_path / "a" / "classifier" / "ckpt")).latest_step() == 8
    c.stop_at_step = -1
    resumed = loop.run_stage(c, str(tmp_path / "a"), "classifier", c.classifier, init, step)
    straight = loop.run_stage(c, str(tmp_path / "b"), "classifier", c.classifier, init, step)
    assert int(resumed.step) == 16 and _tree_equal(resumed, straight)
    with open(tmp_path / "a" / "classifier" / "metrics.jsonl") as f:
        logged = [json.loads(line)["step"] for line in f]
    assert logged == sorted(set(logged)) and logged[-1] == 16, logged     # no step was trained twice


def test_command_line_runs_a_stage_with_config_overrides(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.train", "--config=configs/train_default.py:toy",
           f"--workdir={tmp_path}", "--stage=classifier", "--config.classifier.num_steps=6",
           "--config.classifier.eval_images=32"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _, info = export.load(str(tmp_path / "classifier" / "export"), kind="classifier")
    assert info["meta"]["steps"] == 6 and info["meta"]["eval"]["eval_images"] == 32
    assert "steps/s" in result.stderr and "ETA" in result.stderr


@pytest.mark.slow
def test_command_line_trains_all_stages_at_toy_size(tmp_path):
    """The three stages in order through the command line (each piece is covered by the fast tests above)."""
    cmd = [sys.executable, "-m", "experiments.train", "--config=configs/train_default.py:toy",
           f"--workdir={tmp_path}", "--stage=all"]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for kind in ("vqvae", "var", "classifier"):
        cfg, params, info = export.load_model(str(tmp_path / kind / "export"), kind)
        assert info["meta"]["steps"] == 12 and info["meta"]["eval"] and info["meta"]["image_size"] == 16
        assert jax.tree.leaves(params)
