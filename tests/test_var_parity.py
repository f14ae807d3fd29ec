"""Golden parity of the Flax VQVAE/VAR/sampler against outputs of the official PyTorch code.

Fixtures from the glob in VARQ_PARITY_FIXTURES (default tests/fixtures/var_*.npz); everything about the model
comes from each file's meta_json, so other files of the same format run unchanged.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golden import fixture_files, load_var_fixture, rel_err
from varq_jax import checkpoint, sampling
from varq_jax.models.var import VAR
from varq_jax.models.vqvae import VQVAE

import convert_torch_weights

FILES = fixture_files("VARQ_PARITY_FIXTURES", "var_*.npz")
TOL = 1e-4
pytestmark = pytest.mark.golden


@pytest.fixture(scope="module", params=FILES, ids=[os.path.basename(f) for f in FILES])
def fx(request):
    return load_var_fixture(request.param)


def _nhwc(a):
    return jnp.asarray(a).transpose(0, 2, 3, 1)


def _scales(z, prefix):
    n = len([k for k in z.files if k.startswith(prefix)])
    return [np.asarray(z[f"{prefix}{si}"]) for si in range(n)]


def test_tokenization_and_decoding(fx):
    meta, z, vae_cfg, _, params = fx
    vae, v = VQVAE(vae_cfg), {"params": params["vae"]}
    f = vae.apply(v, _nhwc(z["in/img"]), method=VQVAE.encode)
    assert rel_err(f.transpose(0, 3, 1, 2), z["tok/f"]) <= TOL
    idx, fhats = vae.apply(v, f, method=VQVAE.tokenize)
    for si, ref in enumerate(_scales(z, "tok/idx_")):
        np.testing.assert_array_equal(np.asarray(idx[si]), ref, err_msg=f"tokens of scale {si}")
        assert rel_err(fhats[si].transpose(0, 3, 1, 2), z[f"tok/fhat_{si}"]) <= TOL, f"f_hat of scale {si}"
    img = vae.apply(v, fhats[-1], method=VQVAE.fhat_to_img)
    assert rel_err(img.transpose(0, 3, 1, 2), z["vae/recon_img"]) <= TOL
    # The token maps alone decode to the same f̂.
    assert rel_err(vae.apply(v, idx, method=VQVAE.idx_to_fhat), fhats[-1]) <= TOL


def test_teacher_forced_inputs_and_logits(fx):
    meta, z, vae_cfg, var_cfg, params = fx
    gt = [jnp.asarray(t, jnp.int32) for t in _scales(z, "tok/idx_")]
    x = VQVAE(vae_cfg).apply({"params": params["vae"]}, gt, method=VQVAE.idx_to_var_input)
    assert rel_err(x, z["tf/var_input"]) <= TOL
    logits = VAR(var_cfg).apply({"params": params["var"]}, jnp.asarray(z["in/label"], jnp.int32), x)
    assert rel_err(logits, z["tf/logits"]) <= TOL


def test_forced_token_sampling_run(fx):
    """The KV-cached loop with the official sampler replaced by forced tokens: guided and top-k/top-p-masked
    logits of every scale and the decoded image."""
    meta, z, vae_cfg, var_cfg, params = fx
    forced = [jnp.asarray(t, jnp.int32) for t in _scales(z, "inf/forced_idx_")]
    b, pn = forced[0].shape[0], var_cfg.patch_nums[-1]
    sc = sampling.SamplingConfig(cfg=meta["cfg_scale"], top_k=meta["top_k"], top_p=meta["top_p"])
    generate = jax.jit(functools.partial(sampling.generate, VQVAE(vae_cfg), VAR(var_cfg), sc, collect_logits=True))
    img, tokens, logged = generate(params, None, jnp.asarray(z["in/label"], jnp.int32),
                                   jax.random.split(jax.random.PRNGKey(0), b), forced, jnp.ones((b, pn, pn)))
    for si, (guided, masked) in enumerate(logged):
        assert rel_err(guided, z[f"inf/cfg_logits_{si}"]) <= TOL, f"guided logits of scale {si}"
        assert rel_err(masked, z[f"inf/masked_logits_{si}"]) <= TOL, f"masked logits of scale {si}"
        np.testing.assert_array_equal(np.asarray(tokens[si]), np.asarray(forced[si]))
    assert rel_err(img.transpose(0, 3, 1, 2), z["inf/img"]) <= TOL


WITH_PTH = [f for f in FILES if all(os.path.exists(f[:-len(".npz")] + ext) for ext in (".vae.pth", ".var.pth"))]


@pytest.mark.parametrize("path", WITH_PTH, ids=[os.path.basename(f) for f in WITH_PTH])
def test_converted_pth_gives_same_model(path, tmp_path):
    """Fixtures with sibling .vae.pth/.var.pth files: convert them with the CLI and compare."""
    meta, z, vae_cfg, var_cfg, params = load_var_fixture(path)
    out = tmp_path / "ckpt"
    base = path[:-len(".npz")]
    assert convert_torch_weights.main(["--vae", base + ".vae.pth", "--var", base + ".var.pth", "--out", str(out),
                                       "--patch-nums", ",".join(map(str, meta["patch_nums"]))]) == 0
    ck = checkpoint.load(str(out))
    assert ck.var_cfg == var_cfg and ck.vae_cfg == vae_cfg
    for a, b in zip(jax.tree.leaves(ck.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    gt = [jnp.asarray(t, jnp.int32) for t in _scales(z, "tok/idx_")]
    x = VQVAE(vae_cfg).apply({"params": ck.params["vae"]}, gt, method=VQVAE.idx_to_var_input)
    logits = VAR(var_cfg).apply({"params": ck.params["var"]}, jnp.asarray(z["in/label"], jnp.int32), x)
    assert rel_err(logits, z["tf/logits"]) <= TOL
