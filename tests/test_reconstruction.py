"""BRECQ/AdaRound reconstruction: capture semantics, the official loss/schedules, gains over nearest rounding,
one compiled scan per unit, and bit-exact resumption."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from varq_jax import sampling
from varq_jax.models import var as var_lib
from varq_jax.models import zoo
from varq_jax.models.build import abstract_params
from varq_jax.models.policy import MatmulPolicy
from varq_jax.models.var import VAR
from varq_jax.models.vqvae import VQVAE
from varq_jax.quant import capture as cap
from varq_jax.quant import reconstruction as rec
from varq_jax.quant import state, units
from varq_jax.quant.policy import QuantPolicy

VAE_CFG, VAR_CFG = zoo.tiny((1, 2, 3, 4), depth=2)
POLICY = QuantPolicy(w_bits=4, a_bits=6)
N = 8


@pytest.fixture(scope="module")
def params():
    """Random VAR and VQVAE token-embedding/Phi weights; the VQVAE's encoder and decoder (which no test here
    looks at: sampled images are unused) are zeros, to skip their slow initialisation."""
    vae = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_params(VAE_CFG, VAR_CFG)["vae"])
    toks = [jnp.zeros((1, pn * pn), jnp.int32) for pn in VAE_CFG.patch_nums]
    vae.update(jax.jit(lambda k: VQVAE(VAE_CFG).init(k, toks, method=VQVAE.idx_to_var_input))(
        jax.random.PRNGKey(1))["params"])
    var = jax.jit(lambda k: VAR(VAR_CFG).init(k, jnp.zeros((1,), jnp.int32),
                                              jnp.zeros((1, VAR_CFG.L - 1, VAR_CFG.cvae))))(jax.random.PRNGKey(2))
    return {"vae": vae, "var": var["params"]}


@pytest.fixture(scope="module")
def calib():
    rng = np.random.default_rng(0)
    labels = rng.choice(VAR_CFG.num_classes, N, replace=True)
    tokens = [rng.integers(0, VAR_CFG.vocab_size, (N, pn * pn)).astype(np.int32) for pn in VAR_CFG.patch_nums]
    return labels, tokens


@pytest.fixture(scope="module")
def quant(params):
    # θ small enough that shift-and-sum orders 1–3 occur on the tiny model.
    return state.set_theta(state.init_quant_state(params["var"], POLICY), 0.05)


def test_targets_follow_the_official_order():
    names = [t.name for t in units.recon_targets(VAR_CFG)]
    assert names == ["blocks_0/ada_lin", "blocks_0/attn", "blocks_0/ffn", "blocks_1/ada_lin", "blocks_1/attn",
                     "blocks_1/ffn", "head_nm", "head", "word_embed"]
    _, shared = zoo.tiny((1, 2, 3, 5), shared_aln=True)
    names = [t.name for t in units.recon_targets(shared)]
    assert names[0] == "shared_ada_lin" and not any(n.endswith("ada_lin") for n in names[1:])


@dataclasses.dataclass(frozen=True)
class _SowAttentionInputs(MatmulPolicy):
    """Full precision; every mat_qkv sows its input, which is the attention module's input."""

    def dense(self, module, x, kernel, bias):
        if module.site == "mat_qkv":
            module.sow("intermediates", "x", x)
        return var_lib.dense(x, kernel, bias, module.dtype, module.out_dtype)

    def attention(self, module, q, k, v, scale):
        return var_lib.attention(q, k, v, scale)


def test_capture_equals_kv_cached_sampling(params, calib):
    """Inputs of blocks_1/attn and word_embed from the teacher-forced forward = what the KV-cached sampler feeds
    them when the calibration tokens are forced (keep mask of ones)."""
    labels, tokens = calib
    embedded = []

    def record_word_embed(next_fun, args, kwargs, ctx):
        scope = ctx.module.scope
        if ctx.method_name == "__call__" and scope is not None and tuple(scope.path) == ("word_embed",):
            embedded.append(args[0])
        return next_fun(*args, **kwargs)

    @jax.jit
    def sample(p, lab, toks):
        embedded.clear()
        with nn.intercept_methods(record_word_embed):
            _, out_tokens, sown = sampling.generate(
                VQVAE(VAE_CFG), VAR(VAR_CFG, policy=_SowAttentionInputs()), sampling.SamplingConfig(), p, None, lab,
                jax.random.split(jax.random.PRNGKey(1), N), gt_tokens=toks, keep_mask=jnp.ones((N, 4, 4)),
                collect_intermediates=True)
        attn_in = jnp.concatenate([s["blocks_1"]["attn"]["mat_qkv"]["x"][0] for s in sown], axis=1)
        return out_tokens, attn_in, jnp.concatenate(embedded, axis=1)

    out_tokens, kv_attn, kv_embed = sample(params, jnp.asarray(labels), [jnp.asarray(t) for t in tokens])
    for a, b in zip(out_tokens, tokens):
        np.testing.assert_array_equal(np.asarray(a), b)

    attn = cap.capture(VAE_CFG, VAR_CFG, params, labels, tokens, units.target_by_name(VAR_CFG, "blocks_1/attn"),
                       batch_size=3)
    assert attn.inputs.shape == (N, 2, VAR_CFG.L, VAR_CFG.width)
    kv_attn = np.asarray(kv_attn).reshape(2, N, VAR_CFG.L, -1).swapaxes(0, 1)       # [label; null] rows
    np.testing.assert_allclose(np.asarray(attn.inputs), kv_attn, rtol=1e-5, atol=2e-5)

    emb = cap.capture(VAE_CFG, VAR_CFG, params, labels, tokens, units.target_by_name(VAR_CFG, "word_embed"))
    assert emb.inputs.shape == (N, 1, VAR_CFG.L - 1, VAR_CFG.cvae)       # the sampler embeds before CFG doubling
    np.testing.assert_allclose(np.asarray(emb.inputs[:, 0]), np.asarray(kv_embed), rtol=1e-5, atol=1e-6)


def test_standalone_units_reproduce_captured_outputs(params, calib):
    labels, tokens = calib
    for name in ("blocks_1/ffn", "head"):
        target = units.target_by_name(VAR_CFG, name)
        data = cap.capture(VAE_CFG, VAR_CFG, params, labels, tokens, target)
        assert rec.module_error(VAR_CFG, target, units.subtree(params["var"], target.path), {}, data, None,
                                "nearest") < 1e-9, name


def test_error_of_nearest_and_hard_equals_the_policy_roundings(params, calib, quant):
    """module_error evaluates every rounding through one soft-mode compile with saturated α; it must equal the
    policy's own nearest and hard rounding."""
    labels, tokens = calib
    target = units.target_by_name(VAR_CFG, "head")
    data = cap.capture(VAE_CFG, VAR_CFG, params, labels, tokens, target)
    mp, mq = params["var"]["head"], quant["head"]
    alpha = jax.random.normal(jax.random.PRNGKey(5), mp["kernel"].shape)
    x = data.inputs.reshape(-1, *data.inputs.shape[2:])
    weights = rec.token_weights(units.segments(VAR_CFG, target), x.shape[1])
    for rounding, q in (("nearest", mq), ("hard", {**mq, "alpha": alpha})):
        module = target.spec.build(VAR_CFG, jnp.float32, dataclasses.replace(POLICY, phase=rounding))
        pred = target.spec.apply(module, mp, q, x)
        direct = float(jnp.mean(rec.row_losses(pred, data.outputs.reshape(pred.shape), weights, 2.0)))
        via_soft = rec.module_error(VAR_CFG, target, mp, q, data, POLICY, rounding)
        assert via_soft == pytest.approx(direct, rel=1e-6), rounding


def test_quantized_inputs_change_inputs_not_outputs(params, calib, quant):
    labels, tokens = calib
    target = units.target_by_name(VAR_CFG, "blocks_1/ffn")
    fp = cap.capture(VAE_CFG, VAR_CFG, params, labels, tokens, target)
    q = cap.capture(VAE_CFG, VAR_CFG, params, labels, tokens, target,
                    input_policy=units.partial_model_policy(POLICY), quant=quant)
    np.testing.assert_array_equal(np.asarray(q.outputs), np.asarray(fp.outputs))
    assert float(jnp.abs(q.inputs - fp.inputs).max()) > 1e-3


def test_loss_is_the_official_per_scale_form():
    rng = np.random.default_rng(1)
    segs = VAR_CFG.begin_ends
    pred, tgt = rng.normal(size=(2, 5, VAR_CFG.L, 7)).astype(np.float32)
    expected = sum(np.mean(np.sum((pred[:, s:e] - tgt[:, s:e]) ** 2, -1)) for s, e in segs)   # lp_loss per scale
    got = jnp.mean(rec.row_losses(pred, tgt, rec.token_weights(segs, VAR_CFG.L), 2.0))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize("warmup", [0.0, 0.2])
def test_beta_and_regulariser_switch_follow_linear_temp_decay(warmup):
    rc = rec.ReconConfig(iters=50, warmup=warmup)
    start = warmup * rc.iters

    def official(t):     # LinearTempDecay(t_max=iters, rel_start_decay=warmup, 20, 2) and the loss_start switch
        b = 20 if t < start else 2 + 18 * max(0.0, 1 - (t - start) / (rc.iters - start))
        return b, float(t >= start)

    for t in range(1, rc.iters + 1):
        b, on = official(t)
        assert float(rec.beta_at(rc, t)) == pytest.approx(b, rel=1e-6)
        assert float(rec.regularizer_on(rc, t)) == on


def test_adam_with_cosine_decay_matches_torch():
    """optax's Adam + cosine schedule as configured here = torch Adam + CosineAnnealingLR(T_max=iters, eta_min=0)."""
    iters, lr = 30, 0.05
    target = np.linspace(-1, 1, 6).astype(np.float32)
    grad = lambda x: 2 * (x - target) * (1 + x ** 2)
    x_t = torch.zeros(6, requires_grad=True)
    opt_t = torch.optim.Adam([x_t], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_t, T_max=iters, eta_min=0.0)
    opt = rec.optax.adam(rec.optax.cosine_decay_schedule(lr, iters))
    update = jax.jit(lambda x, s: (lambda u, s: (rec.optax.apply_updates(x, u), s))(*opt.update(grad(x), s, x)))
    x = jnp.zeros(6)
    s = opt.init(x)
    for _ in range(iters):
        opt_t.zero_grad()
        x_t.grad = torch.from_numpy(np.asarray(grad(x_t.detach().numpy()), np.float32))
        opt_t.step()
        sched.step()
        x, s = update(x, s)
    np.testing.assert_allclose(np.asarray(x), x_t.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_block_reconstruction_beats_nearest_rounding(params, calib, quant):
    """W4/A6 attention block: learned rounding (then hard) reconstructs its output much better than nearest.
    A short run needs a larger lr and λ than the 5000-iteration defaults to settle every h(α) at 0 or 1."""
    labels, tokens = calib
    target = units.target_by_name(VAR_CFG, "blocks_0/attn")
    data = cap.capture(VAE_CFG, VAR_CFG, params, labels, tokens, target, batch_size=3)
    mp, mq = units.subtree(params["var"], target.path), units.subtree(quant, target.path)
    rc = rec.ReconConfig(iters=1200, lr=0.1, weight=0.1, log_every=200)
    learned, record = rec.reconstruct_module(VAR_CFG, target, mp, mq, data, POLICY, rc, jax.random.PRNGKey(7))
    assert set(traverse_util.flatten_dict(learned)) - set(traverse_util.flatten_dict(mq)) == \
        {("mat_qkv", "alpha"), ("proj", "alpha")}
    soft = rec.module_error(VAR_CFG, target, mp, learned, data, POLICY, "soft")
    nearest, hard = record["error_nearest"], record["error_hard"]
    assert hard < 0.3 * nearest                            # seeds 0–5 give 0.16–0.18
    assert nearest - hard > 0.9 * (nearest - soft)        # hard keeps most of the soft solution's gain (≥ 0.98)
    assert len(record["rec_loss_curve"]) == 6 and record["round_loss_last"] < record["round_loss_first"]


def test_batches_are_rows_or_whole_samples():
    n, r, t, c = 6, 2, 3, 4
    inputs = jnp.arange(n * r * t * c, dtype=jnp.float32).reshape(n, r, t, c)
    outputs = inputs * 10
    rows_rc = rec.ReconConfig(batch_size=64)
    x, y = rec.draw_batch(jax.random.PRNGKey(0), inputs, outputs, rows_rc)
    assert x.shape == (64, t, c)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 10)
    row_ids = np.asarray(x[:, 0, 0]) // (t * c)
    assert set(row_ids.tolist()) == set(range(n * r))              # rows are drawn independently, all reachable
    x, _ = rec.draw_batch(jax.random.PRNGKey(0), inputs, outputs, dataclasses.replace(rows_rc, batch_unit="samples"))
    assert x.shape == (64 * r, t, c)
    row_ids = (np.asarray(x[:, 0, 0]) // (t * c)).reshape(64, r)
    assert (row_ids[:, 0] % r == 0).all() and (row_ids[:, 1] == row_ids[:, 0] + 1).all()   # label row, null row


def test_the_loop_is_one_scan():
    target = units.target_by_name(VAR_CFG, "head_nm")
    rc = rec.ReconConfig(iters=7)
    p = {"kernel": jnp.ones((VAR_CFG.width, 2 * VAR_CFG.width)) * 0.01, "bias": jnp.zeros(2 * VAR_CFG.width)}
    q = state.init_quant_state({"x": p}, POLICY)["x"]
    a0 = rec.init_module_alpha(p, q, [()])
    x = jnp.ones((3, 2, 1, VAR_CFG.width))
    y = jnp.ones((3, 2, 1, 2 * VAR_CFG.width))
    soft = units.standalone_policy(POLICY, target, p, phase="soft")
    fn = functools.partial(rec.optimize_alpha.__wrapped__, target.spec, VAR_CFG, soft, rc, ((0, 1),))
    jaxpr = jax.make_jaxpr(fn)(p, q, a0, x, y, jax.random.PRNGKey(0)).jaxpr
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == rc.iters
    alpha, rec_curve, reg_curve = rec.optimize_alpha(target.spec, VAR_CFG, soft, rc, ((0, 1),), p, q, a0, x, y,
                                                     jax.random.PRNGKey(0))
    assert rec_curve.shape == reg_curve.shape == (rc.iters,) and alpha["alpha"].shape == p["kernel"].shape


class _Stop(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_state(params, calib, quant, tmp_path, monkeypatch):
    """Partly quantized inputs make blocks_1/ffn depend on the α learned for blocks_0/ffn; a run stopped after
    one unit and restarted ends bit-for-bit where an uninterrupted run does; each unit is one compiled call."""
    labels, tokens = calib
    units = ["blocks_0/ffn", "blocks_1/ffn"]
    rc = rec.ReconConfig(iters=3, lr=1e-2, quantized_inputs=True, measure_errors=False)
    calls = []
    original = rec.optimize_alpha
    monkeypatch.setattr(rec, "optimize_alpha", lambda *a, **k: calls.append(1) or original(*a, **k))
    run = functools.partial(rec.reconstruct_model, VAE_CFG, VAR_CFG, params, quant, labels, tokens, POLICY, rc,
                            key=jax.random.PRNGKey(3), units=units)

    full = run()
    assert full.done == units and len(calls) == len(units)

    def stop_after_first(record, _):
        raise _Stop
    with pytest.raises(_Stop):
        run(workdir=str(tmp_path), callback=stop_after_first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recon-0001"]
    calls.clear()
    resumed = run(workdir=str(tmp_path))
    assert len(calls) == 1 and resumed.done == units

    flat_a, flat_b = traverse_util.flatten_dict(full.quant), traverse_util.flatten_dict(resumed.quant)
    assert flat_a.keys() == flat_b.keys()
    assert sum(k[-1] == "alpha" for k in flat_a) == 4          # fc1, fc2 of two blocks
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=str(k))
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("seconds")}     # wall times differ
    assert [strip(r) for r in full.records] == [strip(r) for r in resumed.records]

    with pytest.raises(ValueError, match=r"other settings \(key: \[0, 3\] there, \[0, 4\] now\)"):
        rec.reconstruct_model(VAE_CFG, VAR_CFG, params, quant, labels, tokens, POLICY, rc, key=jax.random.PRNGKey(4),
                              units=units, workdir=str(tmp_path))


def test_fp_modules_are_not_reconstructed(params, calib, quant):
    labels, tokens = calib
    policy = dataclasses.replace(POLICY, fp_modules=("head",))
    out = rec.reconstruct_model(VAE_CFG, VAR_CFG, params, quant, labels, tokens, policy,
                                rec.ReconConfig(iters=2, measure_errors=False), key=jax.random.PRNGKey(0),
                                units=["head_nm", "head"])
    assert "alpha" in out.quant["head_nm"] and "alpha" not in out.quant["head"]
    assert "skipped" in out.records[1]


def test_bad_input_is_refused_before_work(params, calib, quant):
    labels, tokens = calib
    run = functools.partial(rec.reconstruct_model, VAE_CFG, VAR_CFG, params, quant, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="batch_unit"):
        rec.ReconConfig(batch_unit="images")
    with pytest.raises(ValueError, match="iters"):
        rec.ReconConfig(iters=0)
    with pytest.raises(ValueError, match="unknown reconstruction units"):
        run(labels, tokens, POLICY, units=["blocks_9/attn"])
    with pytest.raises(ValueError, match="no Linear of the selected units"):
        run(labels, tokens, dataclasses.replace(POLICY, weights=False))
    with pytest.raises(ValueError, match="labels"):
        run(labels[:, None], tokens, POLICY)
    with pytest.raises(ValueError, match="scale 2"):
        run(labels, tokens[:2] + [tokens[2][:, :4]] + tokens[3:], POLICY)
    with pytest.raises(ValueError, match="delta"):
        rec.reconstruct_model(VAE_CFG, VAR_CFG, params, {"head": {}}, labels, tokens, POLICY,
                              key=jax.random.PRNGKey(0), units=["head"])


@pytest.mark.parametrize("shared_aln", [False, True])
def test_block_stream_equals_whole_model_capture(params, calib, shared_aln):
    """The stream's data of every block unit equals `capture` of the same unit (which runs the whole model)."""
    labels, tokens = calib
    vae_cfg, var_cfg, p = VAE_CFG, VAR_CFG, params
    if shared_aln:
        vae_cfg, var_cfg = zoo.tiny((1, 2, 3, 4), depth=2, shared_aln=True)
        var = jax.jit(lambda k: VAR(var_cfg).init(k, jnp.zeros((1,), jnp.int32),
                                                  jnp.zeros((1, var_cfg.L - 1, var_cfg.cvae))))(jax.random.PRNGKey(5))
        p = {"vae": params["vae"], "var": var["params"]}
    stream = cap.BlockStream(vae_cfg, var_cfg, p, labels, tokens, batch_size=3)
    block_units = [t for t in units.recon_targets(var_cfg) if t.in_block]
    assert [t.name for t in block_units][:2] == (["blocks_0/attn", "blocks_0/ffn"] if shared_aln
                                                else ["blocks_0/ada_lin", "blocks_0/attn"])
    for t in block_units:
        a, b = stream.get(t), cap.capture(vae_cfg, var_cfg, p, labels, tokens, t, batch_size=3)
        assert a.inputs.shape == b.inputs.shape and a.outputs.shape == b.outputs.shape, t.name
        np.testing.assert_allclose(np.asarray(a.inputs), np.asarray(b.inputs), rtol=1e-6, atol=1e-6, err_msg=t.name)
        np.testing.assert_allclose(np.asarray(a.outputs), np.asarray(b.outputs), rtol=1e-6, atol=1e-6,
                                   err_msg=t.name)
    with pytest.raises(ValueError, match="only moves forward"):
        stream.get(block_units[0])
    with pytest.raises(ValueError, match="not a block unit"):
        stream.get(units.target_by_name(var_cfg, "head"))


def test_fp_input_reconstruction_captures_the_model_only_for_non_block_units(params, calib, quant, monkeypatch):
    labels, tokens = calib
    whole_model = []
    original = rec.capture
    monkeypatch.setattr(rec, "capture", lambda *a, **k: whole_model.append(a[5].name) or original(*a, **k))
    out = rec.reconstruct_model(VAE_CFG, VAR_CFG, params, quant, labels, tokens, POLICY,
                                rec.ReconConfig(iters=2, measure_errors=False), key=jax.random.PRNGKey(0),
                                units=["blocks_0/attn", "blocks_1/ada_lin", "blocks_1/ffn", "head"])
    assert out.done == ["blocks_0/attn", "blocks_1/ada_lin", "blocks_1/ffn", "head"] and whole_model == ["head"]


def test_chunked_loop_reports_per_chunk_and_learns_the_same(params, calib, quant):
    """The α loop in chunks (progress between compiled scans) runs the same iterations as one scan."""
    labels, tokens = calib
    target = units.target_by_name(VAR_CFG, "blocks_0/ffn")
    data = cap.capture(VAE_CFG, VAR_CFG, params, labels, tokens, target)
    mp, mq = params["var"]["blocks_0"]["ffn"], quant["blocks_0"]["ffn"]
    reports = []
    rc = rec.ReconConfig(iters=6, chunk_iters=2, measure_errors=False)
    chunked, r1 = rec.reconstruct_module(VAR_CFG, target, mp, mq, data, POLICY, rc, jax.random.PRNGKey(4),
                                         lambda done, total, loss: reports.append((done, total, loss)))
    assert [(d, t) for d, t, _ in reports] == [(2, 6), (4, 6), (6, 6)]
    assert reports[-1][2] == pytest.approx(r1["rec_loss_last"])
    whole, r2 = rec.reconstruct_module(VAR_CFG, target, mp, mq, data, POLICY, dataclasses.replace(rc, chunk_iters=0),
                                       jax.random.PRNGKey(4))
    for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert r1["rec_loss_curve"] == pytest.approx(r2["rec_loss_curve"], rel=1e-5)


def test_progress_lines_live_and_piped():
    import io
    from varq_jax.progress import Progress, eta
    now = [0.0]
    piped = io.StringIO()
    p = Progress(piped, interval=30, live=False, clock=lambda: now[0])
    for t in range(0, 100, 5):                    # an update every 5 s for 100 s
        now[0] = float(t)
        p.update(f"step {t}")
    p.update("done", final=True)
    assert piped.getvalue().splitlines() == ["step 0", "step 30", "step 60", "step 90", "done"]
    tty = io.StringIO()
    q = Progress(tty, live=True)
    q.update("a long line")
    q.update("b", final=True)
    assert tty.getvalue() == "\ra long line" + "\r" + "b".ljust(11) + "\n"
    assert eta(1, 4, 20.0) == "ETA 1 m 00 s" and eta(3, 4, 6.0) == "ETA 2 s" and eta(4, 4, 1.0) == ""


def test_progress_line_gives_the_stage_and_the_run_eta():
    from varq_jax.quant.recon_stage import progress_line
    # unit 2 of 4 half done after 50 s: 1.5 of 4 units → 50 / 1.5 · 2.5 ≈ 83 s left; θ afterwards took 40 s
    line = progress_line("blocks_0/ffn", 250, 500, 0.125, 10.0, 1, 4, 50.0, after_s=40.0)
    assert "iter 250/500" in line and "unit 2/4" in line and "loss 0.125" in line
    assert "ETA 1 m 23 s, run ETA 2 m 03 s" in line
    assert "run ETA" not in progress_line("head", 250, 500, 0.1, 1.0, 0, 1, 5.0)
    assert "ETA" not in progress_line("head", 500, 500, 0.1, 1.0, 0, 1, 5.0)
