"""The compiled sampler: determinism, masking, shapes, editing, and bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varq_jax import sampling
from varq_jax.models import zoo
from varq_jax.models.var import VAR
from varq_jax.models.vqvae import VQVAE

VAE_CFG, VAR_CFG = zoo.tiny((1, 2, 3, 4))
SC = sampling.SamplingConfig(cfg=1.5, top_k=8, top_p=0.9)


@pytest.fixture(scope="module")
def params(tiny_params):
    p = tiny_params                                # init_params(VAE_CFG, VAR_CFG, PRNGKey(0)), made once per run
    # Sharpen the head so that top-k/top-p leave several but not all codes.
    p["var"]["head"]["kernel"] = p["var"]["head"]["kernel"] * 30
    return p


@pytest.fixture(scope="module")
def sampler():
    return sampling.Sampler(VAE_CFG, VAR_CFG, SC, dtype=jnp.float32)


def test_shapes_range_and_determinism(params, sampler):
    labels = np.array([0, 3, 10, 7])         # 10 = the null class (unconditional); batch 4 as in the next test
    img, toks = sampler(params, labels, jax.random.PRNGKey(1))           # (the sampler compiles once for both)
    assert img.shape == (4, VAE_CFG.image_size, VAE_CFG.image_size, 3) and img.dtype == jnp.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert [t.shape for t in toks] == [(4, pn * pn) for pn in VAR_CFG.patch_nums]
    img2, toks2 = sampler(params, labels, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(img), np.asarray(img2))
    _, toks3 = sampler(params, labels, jax.random.PRNGKey(2))
    assert any(not np.array_equal(a, b) for a, b in zip(toks, toks3))


def test_image_depends_only_on_its_own_key(params, sampler):
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    _, toks = sampler(params, np.array([1, 2, 3, 4]), keys)
    _, sub = sampler(params, np.array([3, 4]), keys[2:])
    for a, b in zip(toks, sub):
        np.testing.assert_array_equal(np.asarray(a)[2:], np.asarray(b))


def test_never_samples_a_masked_token(params):
    labels = jnp.arange(6) % VAR_CFG.num_classes
    keys = jax.random.split(jax.random.PRNGKey(3), 6)
    gen = jax.jit(lambda p, l, k: sampling.generate(VQVAE(VAE_CFG), VAR(VAR_CFG), SC, p, None, l, k,
                                                    collect_logits=True))
    _, toks, logged = gen(params, labels, keys)
    n_kept = []
    for t, (_, masked) in zip(toks, logged):
        picked = np.take_along_axis(np.asarray(masked), np.asarray(t)[..., None], -1)
        assert np.isfinite(picked).all()
        n_kept.append(np.isfinite(np.asarray(masked)).sum(-1))
    n_kept = np.concatenate([k.ravel() for k in n_kept])
    assert n_kept.max() <= SC.top_k and n_kept.min() >= 1 and (n_kept < SC.top_k).any()


def test_mask_top_k_top_p_semantics():
    logits = jnp.array([[0.0, 3.0, 1.0, 2.0, 2.0, -1.0]])
    np.testing.assert_array_equal(np.isfinite(sampling.mask_top_k_top_p(logits, 3, 1.0)), [[0, 1, 0, 1, 1, 0]])
    np.testing.assert_array_equal(np.isfinite(sampling.mask_top_k_top_p(logits, 2, 1.0)),   # tie at the k-th
                                  [[0, 1, 0, 1, 1, 0]])
    p = np.exp([3.0, 2.0, 2.0, 1.0]) / np.exp([3.0, 2.0, 2.0, 1.0]).sum()
    keep = sampling.mask_top_k_top_p(logits, 4, float(p[0] - 1e-3))    # the top alone has mass ≥ p
    np.testing.assert_array_equal(np.isfinite(keep), [[0, 1, 0, 0, 0, 0]])
    keep = sampling.mask_top_k_top_p(logits, 4, float(p[0] + p[1] + p[2] + 1e-3))
    np.testing.assert_array_equal(np.isfinite(keep), [[0, 1, 1, 1, 1, 0]])


def test_more_smooth_runs_and_differs(params):
    smooth = sampling.Sampler(VAE_CFG, VAR_CFG, sampling.SamplingConfig(1.5, 8, 0.9, more_smooth=True),
                              dtype=jnp.float32)
    plain = sampling.Sampler(VAE_CFG, VAR_CFG, SC, dtype=jnp.float32)
    a, _ = smooth(params, np.array([1, 2]), jax.random.PRNGKey(0))
    b, _ = plain(params, np.array([1, 2]), jax.random.PRNGKey(0))
    assert a.shape == b.shape and not np.allclose(np.asarray(a), np.asarray(b))


def test_editing_keeps_the_unmasked_tokens(params, sampler):
    img = jax.random.uniform(jax.random.PRNGKey(4), (2, VAE_CFG.image_size, VAE_CFG.image_size, 3), minval=-1)
    gt = VQVAE(VAE_CFG).apply({"params": params["vae"]}, img, method=VQVAE.img_to_idx)
    pn = VAR_CFG.patch_nums[-1]
    keep = np.ones((pn, pn), np.float32)
    keep[1:3, 1:4] = 0                                   # inpaint a box, keep the rest
    _, toks = sampler(params, np.array([VAR_CFG.num_classes] * 2), jax.random.PRNGKey(9), gt_tokens=gt,
                      keep_mask=keep)
    for si, p in enumerate(VAR_CFG.patch_nums):
        m = np.asarray(sampling.keep_mask_at(jnp.asarray(keep)[None], p)).reshape(-1)
        np.testing.assert_array_equal(np.asarray(toks[si])[:, m], np.asarray(gt[si])[:, m])
    assert not np.array_equal(np.asarray(toks[-1])[:, keep.reshape(-1) == 0], np.asarray(gt[-1])[:, keep.reshape(-1) == 0])


@pytest.mark.parametrize("labels, settings, match", [
    (np.array([0, 11]), SC, r"labels must lie in \[0, 10\]"),
    (np.array([-1]), SC, r"labels must lie"),
    (np.zeros(0, np.int32), SC, "non-empty"),
    (np.array([1]), dataclasses.replace(SC, cfg=-0.5), "cfg"),
    (np.array([1]), dataclasses.replace(SC, top_p=0.0), "top_p"),
    (np.array([1]), dataclasses.replace(SC, top_p=1.5), "top_p"),
    (np.array([1]), dataclasses.replace(SC, top_k=-1), "top_k"),
    (np.array([1]), dataclasses.replace(SC, top_k=65), "top_k"),
])
def test_bad_input(labels, settings, match):
    with pytest.raises(ValueError, match=match):
        sampling.validate(settings, VAR_CFG, labels)
