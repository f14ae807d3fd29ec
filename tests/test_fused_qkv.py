"""The Pallas q/k/v kernel of GPU sampling (run in Pallas' interpret mode here) against the XLA math."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varq_jax import sampling
from varq_jax.models import fused_qkv, zoo
from varq_jax.models.var import VAR, qkv_heads
from varq_jax.models.vqvae import VQVAE

HEADS, D = 4, 16
MODES = [True] + ([False] if jax.default_backend() == "gpu" else [])     # interpret mode; compiled on a GPU


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("lead", [(2, 9), (2, 64), (3, 40)])      # 18 rows (tiles of 2), 128 (64), 120 (8)
@pytest.mark.parametrize("interpret", MODES)
def test_kernel_matches_xla_math(dtype, tol, lead, interpret):
    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.normal(size=lead + (3 * HEADS * D,)), dtype)
    q_bias, v_bias = (jnp.asarray(rng.normal(size=HEADS * D) * 0.5, jnp.float32) for _ in range(2))
    head_scale = jnp.asarray(rng.uniform(0.5, 30.0, size=HEADS), jnp.float32)
    want = [t.astype(dtype) for t in qkv_heads(qkv, q_bias, v_bias, HEADS, head_scale)]
    got = fused_qkv.qkv_heads(qkv, q_bias, v_bias, head_scale, HEADS, interpret=interpret)
    for name, w, g in zip("qkv", want, got):
        assert g.shape == lead + (HEADS, D) and g.dtype == dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol * 30, rtol=tol,
                                   err_msg=name)
    # Each head of q is unit-norm times its scale, each head of k unit-norm: the normalisation is per head.
    norms = np.linalg.norm(np.asarray(got[0], np.float32), axis=-1)
    np.testing.assert_allclose(norms, np.broadcast_to(np.asarray(head_scale), norms.shape), rtol=2 * tol)


def test_tiles_never_run_past_the_last_row():
    for n in (1, 2, 18, 100, 128, 12800, 32768, 6):
        rows = fused_qkv._rows_per_tile(n)
        assert n % rows == 0 and rows <= fused_qkv.MAX_ROWS and rows & (rows - 1) == 0


def test_only_used_on_gpu_for_16_bit_outputs_and_power_of_two_heads():
    on_gpu = jax.default_backend() == "gpu"
    assert fused_qkv.supported(jnp.zeros((2, 48), jnp.bfloat16), 16) == on_gpu
    assert not fused_qkv.supported(jnp.zeros((2, 48), jnp.float32), 16)      # float32 GEMM output
    assert not fused_qkv.supported(jnp.zeros((2, 72), jnp.bfloat16), 24)     # not a Triton tile size


@pytest.fixture(scope="module")
def tiny(tiny_params):
    """The tiny model (init_params(..., PRNGKey(0)), made once per run) and token maps to teacher-force: random ones
    feed both paths the same inputs as sampled ones would, without compiling a free-running sampler per test."""
    vae_cfg, var_cfg = zoo.tiny((1, 2, 3, 4))
    params = tiny_params
    tokens = [jax.random.randint(jax.random.PRNGKey(10 + i), (2, pn * pn), 0, var_cfg.vocab_size)
              for i, pn in enumerate(var_cfg.patch_nums)]
    return vae_cfg, var_cfg, params, tokens


@pytest.mark.parametrize("scan_blocks", [True, False])
def test_sampler_with_the_kernel_matches_the_xla_path(monkeypatch, tiny, scan_blocks):
    """The kernel wired into the unrolled sampler (interpret mode standing in for the GPU): same guided logits as
    the XLA path at every scale, with the tokens teacher-forced so both runs see the same inputs. The scanned
    sampler keeps XLA's fusions."""
    vae_cfg, var_cfg, params, tokens = tiny
    settings = sampling.SamplingConfig(cfg=1.5, top_k=8, top_p=0.9)
    labels, keys = jnp.array([1, 2]), jax.random.split(jax.random.PRNGKey(1), 2)
    vae, var = VQVAE(vae_cfg, jnp.bfloat16), VAR(var_cfg, jnp.bfloat16)
    run = jax.jit(functools.partial(sampling.generate, vae, var, settings, collect_logits=True,
                                    scan_blocks=scan_blocks))
    keep = jnp.ones((2,) + (var_cfg.patch_nums[-1],) * 2)
    _, _, want = run(params, None, labels, keys, tokens, keep)
    calls = []
    kernel = fused_qkv.qkv_heads
    monkeypatch.setattr(fused_qkv, "supported", lambda qkv, d: qkv.dtype == jnp.bfloat16)
    monkeypatch.setattr(fused_qkv, "qkv_heads", lambda *a: calls.append(1) or kernel(*a, interpret=True))
    run = jax.jit(functools.partial(sampling.generate, vae, var, settings, collect_logits=True,
                                    scan_blocks=scan_blocks))
    _, _, got = run(params, None, labels, keys, tokens, keep)
    assert bool(calls) == (not scan_blocks), calls
    for si, ((g, _), (w, _)) in enumerate(zip(got, want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=0.05, rtol=0.05, err_msg=f"scale {si}")
