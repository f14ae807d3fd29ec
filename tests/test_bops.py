"""BOP totals and the shift-and-sum threshold against the official `compute_bitop.py` (sas_bops.npz)."""
import json
import os
import time

import numpy as np
import pytest

from varq_jax.models.var import VARConfig
from varq_jax.quant import bops
from varq_jax.quant.policy import QuantPolicy

FIXTURES = os.environ.get("VARQ_BOPS_FIXTURES", os.path.join(os.path.dirname(__file__), "fixtures", "sas_bops.npz"))


def _load():
    z = np.load(FIXTURES)
    meta = json.loads(str(z["meta_json"]))
    cfg = VARConfig(depth=meta["depth"], width=meta["C"], heads=meta["H"], vocab_size=meta["V"],
                    cvae=meta["Cvae"], num_classes=meta["num_classes"], patch_nums=tuple(meta["patch_nums"]),
                    mlp_ratio=meta.get("mlp_ratio", 4.0))
    assert cfg.head_dim == meta["head_dim"]
    means, counts = [], []
    for block in range(meta["depth"]):
        for scale in range(len(meta["patch_nums"])):
            means.append(z[f"attn_mean/block{block}/scale{scale}"])
            counts.append(int(z[f"attn_len/block{block}/scale{scale}"]))
    return z, meta, cfg, means, counts


_Z, _META, _CFG, _MEANS, _COUNTS = _load()
_TOTAL_KEYS = sorted(k for k in _Z.files if k.startswith("total_bitops_w"))
_THETA_KEYS = sorted(k for k in _Z.files if k.startswith("theta_alpha"))


def _budget_total():
    return bops.total_bops(_CFG, QuantPolicy(w_bits=int(_META["w_bit_for_theta"]), a_bits=int(_META["a_bit_for_theta"])))


@pytest.mark.golden
@pytest.mark.parametrize("key", _TOTAL_KEYS)
def test_total_bops_match_official(key):
    w_bits, a_bits = (int(b) for b in key[len("total_bitops_w"):].split("a"))
    assert bops.total_bops(_CFG, QuantPolicy(w_bits=w_bits, a_bits=a_bits)) == int(_Z[key])


def test_fixture_has_all_settings():
    assert len(_TOTAL_KEYS) >= 5 and _THETA_KEYS


@pytest.mark.golden
@pytest.mark.parametrize("key", _THETA_KEYS)
def test_theta_matches_official(key):
    alpha, grids = key[len("theta_alpha"):].split("_grids")
    n_grids = int(grids)
    theta = bops.search_theta(_MEANS, _COUNTS, _budget_total(), _META["a_bit_for_theta"], _META["head_dim"],
                              alpha=float(alpha), n_grids=n_grids)
    ref = float(_Z[key])
    # Same grid index; the value may differ by an ulp (torch's float32 linspace rounds differently).
    assert round(theta * n_grids) == round(ref * n_grids)
    np.testing.assert_allclose(theta, ref, rtol=1e-6)


def test_grid_evaluation_equals_per_theta_formula():
    thetas = bops.theta_grid(1000)
    grid = bops.sas_extra_bops_grid(_MEANS, _COUNTS, thetas, 6, _META["head_dim"])
    for i in (0, 7, 34, 35, 120, 999):
        single = bops.sas_extra_bops(_MEANS, _COUNTS, float(thetas[i]), 6, _META["head_dim"])
        assert grid[i] == single
    assert np.all(np.diff(grid) <= 0)                       # extra BOPs never grow with θ
    assert grid[0] > grid[-1] > 0                           # θ = 1: only the fixed costs remain


def test_extra_bops_against_a_direct_loop():
    """The reference's formula written out per element (float64), for a few θ."""
    b_h_s2 = [m.shape for m in _MEANS]
    for theta in (0.01, 0.035, 0.3):
        expect = 0.0
        for m, s1, (b, h, s2) in zip(_MEANS, _COUNTS, b_h_s2):
            with np.errstate(divide="ignore"):
                n = np.clip(np.ceil(np.log2(m.astype(np.float64) / np.float32(theta))), 0, 3)
            copies = np.sum(2 ** n - 1)
            expect += (b * h * s1 * s2 * 16 + b * h * s2 * 16 + b * h * s2 * 4 + copies * 64 * 16 + copies * s1
                       + s1 * copies * 64 * 6 ** 2) / b
        np.testing.assert_allclose(bops.sas_extra_bops(_MEANS, _COUNTS, theta, 6, 64), expect, rtol=1e-12)


def test_search_theta_errors():
    total = _budget_total()
    with pytest.raises(ValueError, match="n_grids"):          # budget so large that θ = 1/G already fits
        bops.search_theta(_MEANS, _COUNTS, total, 6, 64, alpha=10.0, n_grids=100)
    with pytest.raises(ValueError, match="no θ"):              # below even the θ-independent costs
        bops.search_theta(_MEANS, _COUNTS, total, 6, 64, alpha=1e-6, n_grids=100)
    with pytest.raises(ValueError, match="bits"):
        bops.search_theta(_MEANS, _COUNTS, total, 9, 64)
    with pytest.raises(ValueError, match="one query count"):
        bops.search_theta(_MEANS, _COUNTS[:-1], total, 6, 64)
    with pytest.raises(ValueError, match="bits"):
        bops.total_bops(_CFG, QuantPolicy(w_bits=1, a_bits=6))


def test_ten_thousand_grid_is_fast():
    total = _budget_total()
    bops.search_theta(_MEANS, _COUNTS, total, 6, 64, n_grids=10_000)           # compile
    start = time.perf_counter()
    bops.search_theta(_MEANS, _COUNTS, total, 6, 64, alpha=0.005, n_grids=10_000)
    assert time.perf_counter() - start < 1.0


def test_linear_sites_cover_every_quantized_linear():
    sites = bops.linear_sites(_CFG)
    assert len(sites) == 1 + 5 * _CFG.depth + 2
    names = [s.name for s in sites]
    assert names[0] == "word_embed" and names[-2:] == ["head_nm", "head"]
    word_embed = sites[0]
    assert word_embed.token_counts == tuple(pn * pn for pn in _CFG.patch_nums[1:])
    assert all(s.multiplier == _CFG.num_scales for s in sites if s.token_counts == (1,))
    shared = bops.linear_sites(VARConfig(depth=2, width=128, heads=2, shared_aln=True, patch_nums=(1, 2, 3)))
    assert [s.name for s in shared].count("shared_ada_lin") == 1
    assert not any(s.name.endswith("ada_lin") and s.name.startswith("blocks") for s in shared)
