"""FID InceptionV3 in Flax: resizes, preprocessing, the forward pass against an independent torch functional
version of pytorch-fid's network, and the strict weight converter with its atomic Orbax checkpoint."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from varq_jax.eval import convert_inception as conv_mod
from varq_jax.eval import inception as inc
from varq_jax.torch_mapping import ConversionError


# --- pytorch-fid's architecture, written out independently of our Flax module ---------------------------------
def _conv(name, cin, cout, k=(1, 1), stride=1, pad=(0, 0)):
    k = (k, k) if isinstance(k, int) else k
    pad = (pad, pad) if isinstance(pad, int) else pad
    return (name, cin, cout, k, stride, pad)


def _block_a(n, cin, pool):
    return [_conv(f"{n}.branch1x1", cin, 64), _conv(f"{n}.branch5x5_1", cin, 48),
            _conv(f"{n}.branch5x5_2", 48, 64, 5, pad=2), _conv(f"{n}.branch3x3dbl_1", cin, 64),
            _conv(f"{n}.branch3x3dbl_2", 64, 96, 3, pad=1), _conv(f"{n}.branch3x3dbl_3", 96, 96, 3, pad=1),
            _conv(f"{n}.branch_pool", cin, pool)]


def _block_c(n, c7):
    return [_conv(f"{n}.branch1x1", 768, 192), _conv(f"{n}.branch7x7_1", 768, c7),
            _conv(f"{n}.branch7x7_2", c7, c7, (1, 7), pad=(0, 3)), _conv(f"{n}.branch7x7_3", c7, 192, (7, 1), pad=(3, 0)),
            _conv(f"{n}.branch7x7dbl_1", 768, c7), _conv(f"{n}.branch7x7dbl_2", c7, c7, (7, 1), pad=(3, 0)),
            _conv(f"{n}.branch7x7dbl_3", c7, c7, (1, 7), pad=(0, 3)),
            _conv(f"{n}.branch7x7dbl_4", c7, c7, (7, 1), pad=(3, 0)),
            _conv(f"{n}.branch7x7dbl_5", c7, 192, (1, 7), pad=(0, 3)), _conv(f"{n}.branch_pool", 768, 192)]


def _block_e(n, cin):
    return [_conv(f"{n}.branch1x1", cin, 320), _conv(f"{n}.branch3x3_1", cin, 384),
            _conv(f"{n}.branch3x3_2a", 384, 384, (1, 3), pad=(0, 1)),
            _conv(f"{n}.branch3x3_2b", 384, 384, (3, 1), pad=(1, 0)), _conv(f"{n}.branch3x3dbl_1", cin, 448),
            _conv(f"{n}.branch3x3dbl_2", 448, 384, 3, pad=1),
            _conv(f"{n}.branch3x3dbl_3a", 384, 384, (1, 3), pad=(0, 1)),
            _conv(f"{n}.branch3x3dbl_3b", 384, 384, (3, 1), pad=(1, 0)), _conv(f"{n}.branch_pool", cin, 192)]


CONVS = (
    [_conv("Conv2d_1a_3x3", 3, 32, 3, stride=2), _conv("Conv2d_2a_3x3", 32, 32, 3),
     _conv("Conv2d_2b_3x3", 32, 64, 3, pad=1), _conv("Conv2d_3b_1x1", 64, 80),
     _conv("Conv2d_4a_3x3", 80, 192, 3)]
    + _block_a("Mixed_5b", 192, 32) + _block_a("Mixed_5c", 256, 64) + _block_a("Mixed_5d", 288, 64)
    + [_conv("Mixed_6a.branch3x3", 288, 384, 3, stride=2), _conv("Mixed_6a.branch3x3dbl_1", 288, 64),
       _conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3, pad=1), _conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3, stride=2)]
    + _block_c("Mixed_6b", 128) + _block_c("Mixed_6c", 160) + _block_c("Mixed_6d", 160) + _block_c("Mixed_6e", 192)
    + [_conv("Mixed_7a.branch3x3_1", 768, 192), _conv("Mixed_7a.branch3x3_2", 192, 320, 3, stride=2),
       _conv("Mixed_7a.branch7x7x3_1", 768, 192), _conv("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7), pad=(0, 3)),
       _conv("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1), pad=(3, 0)),
       _conv("Mixed_7a.branch7x7x3_4", 192, 192, 3, stride=2)]
    + _block_e("Mixed_7b", 1280) + _block_e("Mixed_7c", 2048))
CONV_SPEC = {c[0]: c for c in CONVS}


def random_state_dict(seed=0, with_counters=True):
    """A pytorch-fid-shaped state_dict with random weights that keep activations O(1)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, cin, cout, (kh, kw), _, _ in CONVS:
        sd[f"{name}.conv.weight"] = (rng.standard_normal((cout, cin, kh, kw), np.float32)
                                     * np.float32(np.sqrt(2.0 / (cin * kh * kw))))
        sd[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        sd[f"{name}.bn.bias"] = rng.normal(0, 0.1, cout).astype(np.float32)
        sd[f"{name}.bn.running_mean"] = rng.normal(0, 0.1, cout).astype(np.float32)
        sd[f"{name}.bn.running_var"] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
        if with_counters:
            sd[f"{name}.bn.num_batches_tracked"] = np.array(0, np.int64)
    sd["fc.weight"] = rng.normal(0, 0.05, (1008, 2048)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 1, 1008).astype(np.float32)
    return sd


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict()


@pytest.fixture(scope="module")
def variables(state_dict):
    return conv_mod.convert_state_dict(state_dict)


# --- torch functional reference ------------------------------------------------------------------------------
def _t(sd, name, x):
    _, _, _, _, stride, pad = CONV_SPEC[name]
    x = F.conv2d(x, sd[f"{name}.conv.weight"], stride=stride, padding=pad)
    x = F.batch_norm(x, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"], sd[f"{name}.bn.weight"],
                     sd[f"{name}.bn.bias"], training=False, eps=1e-3)
    return F.relu(x)


def _avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def torch_reference(sd, images_uint8):
    """pytorch-fid's InceptionV3 (resize_input, normalize_input) with torch ops; returns pool, Mixed_6d, fc."""
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
    c = lambda n, x: _t(sd, n, x)
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255
    x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    for n in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = c(n, x)
    x = F.max_pool2d(x, 3, 2)
    x = F.max_pool2d(c("Conv2d_4a_3x3", c("Conv2d_3b_1x1", x)), 3, 2)
    for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = torch.cat([c(f"{n}.branch1x1", x), c(f"{n}.branch5x5_2", c(f"{n}.branch5x5_1", x)),
                       c(f"{n}.branch3x3dbl_3", c(f"{n}.branch3x3dbl_2", c(f"{n}.branch3x3dbl_1", x))),
                       c(f"{n}.branch_pool", _avg(x))], 1)
    x = torch.cat([c("Mixed_6a.branch3x3", x),
                   c("Mixed_6a.branch3x3dbl_3", c("Mixed_6a.branch3x3dbl_2", c("Mixed_6a.branch3x3dbl_1", x))),
                   F.max_pool2d(x, 3, 2)], 1)
    for n in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        b7 = c(f"{n}.branch7x7_3", c(f"{n}.branch7x7_2", c(f"{n}.branch7x7_1", x)))
        bd = x
        for i in range(1, 6):
            bd = c(f"{n}.branch7x7dbl_{i}", bd)
        x = torch.cat([c(f"{n}.branch1x1", x), b7, bd, c(f"{n}.branch_pool", _avg(x))], 1)
        if n == "Mixed_6d":
            mixed_6d = x
    b7 = x
    for i in range(1, 5):
        b7 = c(f"Mixed_7a.branch7x7x3_{i}", b7)
    x = torch.cat([c("Mixed_7a.branch3x3_2", c("Mixed_7a.branch3x3_1", x)), b7, F.max_pool2d(x, 3, 2)], 1)
    for n, pool in (("Mixed_7b", _avg), ("Mixed_7c", lambda t: F.max_pool2d(t, 3, stride=1, padding=1))):
        b3 = c(f"{n}.branch3x3_1", x)
        bd = c(f"{n}.branch3x3dbl_2", c(f"{n}.branch3x3dbl_1", x))
        x = torch.cat([c(f"{n}.branch1x1", x), c(f"{n}.branch3x3_2a", b3), c(f"{n}.branch3x3_2b", b3),
                       c(f"{n}.branch3x3dbl_3a", bd), c(f"{n}.branch3x3dbl_3b", bd),
                       c(f"{n}.branch_pool", pool(x))], 1)
    pool = x.mean(dim=(2, 3))
    return pool.numpy(), mixed_6d.numpy(), F.linear(pool, sd["fc.weight"], sd["fc.bias"]).numpy()


# --- resize and preprocessing ------------------------------------------------------------------------------
def _tf1_bilinear_direct(img, out_h, out_w):
    """TF1 ResizeBilinear (legacy, align_corners=False) pixel by pixel, top/bottom lerp as in its kernel."""
    in_h, in_w = img.shape[:2]
    sy, sx = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
    out = np.zeros((out_h, out_w) + img.shape[2:], np.float64)
    for y in range(out_h):
        fy = np.float32(y) * sy
        y0, y1, dy = int(np.floor(fy)), min(int(np.ceil(fy)), in_h - 1), fy - np.floor(fy)
        for x in range(out_w):
            fx = np.float32(x) * sx
            x0, x1, dx = int(np.floor(fx)), min(int(np.ceil(fx)), in_w - 1), fx - np.floor(fx)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[y, x] = top + (bottom - top) * dy
    return out


def test_tf1_bilinear_matrix_rows_and_identity():
    for n in (1, 7, 256, 299, 512):
        m = inc.tf1_bilinear_matrix(299, n)
        assert m.shape == (299, n)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
        assert (m >= 0).all()
    np.testing.assert_array_equal(inc.tf1_bilinear_matrix(299, 299), np.eye(299, dtype=np.float32))
    # legacy TF samples at dst·in/out (no half-pixel shift): output 0 copies input 0, output 1 of 2→4 is halfway
    np.testing.assert_allclose(inc.tf1_bilinear_matrix(4, 2), [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])


def test_adm_preprocess_matches_direct_tf1_resize():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1, 23, 31, 3), dtype=np.uint8)
    got = np.asarray(inc.preprocess_images(jnp.asarray(img), "adm"))
    ref = (_tf1_bilinear_direct(img[0].astype(np.float64), 299, 299) - 128) / 128
    assert got.shape == (1, 299, 299, 3)
    np.testing.assert_allclose(got[0], ref, atol=2e-6)


def test_pytorch_fid_preprocess_matches_torch_interpolate():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    got = np.asarray(inc.preprocess_images(jnp.asarray(img), "pytorch_fid"))
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    ref = (2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1).permute(0, 2, 3, 1)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-6)


def test_preprocess_value_ranges_and_float_input():
    img = np.zeros((2, 299, 299, 3), np.uint8)
    img[1] = 255
    adm = np.asarray(inc.preprocess_images(jnp.asarray(img), "adm"))
    np.testing.assert_allclose(adm[0], -1.0)                     # (0 − 128) / 128
    np.testing.assert_allclose(adm[1], 127 / 128)                # (255 − 128) / 128, as the TF graph
    torchish = np.asarray(inc.preprocess_images(jnp.asarray(img), "pytorch_fid"))
    np.testing.assert_allclose(torchish[1], 1.0)
    rng = np.random.default_rng(2)
    u8 = rng.integers(0, 256, (1, 40, 40, 3), dtype=np.uint8)
    for mode in inc.PREPROCESS_MODES:
        a = inc.preprocess_images(jnp.asarray(u8), mode)
        b = inc.preprocess_images(jnp.asarray(u8 / np.float32(255)), mode)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("images, mode, match", [
    (np.zeros((2, 8, 8), np.uint8), "adm", "NHWC"),
    (np.zeros((2, 8, 8, 4), np.uint8), "adm", "3 channels"),
    (np.zeros((2, 8, 8, 3), np.int32), "adm", "dtype"),
    (np.zeros((2, 8, 8, 3), np.uint8), "tf", "mode"),
])
def test_preprocess_rejects_bad_input(images, mode, match):
    with pytest.raises(ValueError, match=match):
        inc.preprocess_images(jnp.asarray(images), mode)


# --- network -----------------------------------------------------------------------------------------------
def test_forward_matches_torch_reference(state_dict, variables):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 37, 45, 3), dtype=np.uint8)
    out = jax.jit(inc.InceptionV3(preprocess="pytorch_fid").apply)(variables, jnp.asarray(images))
    assert out.pool.shape == (2, inc.POOL_DIM) == (2, 2048)
    assert out.spatial.shape == (2, inc.SPATIAL_DIM) == (2, 17 * 17 * 7)
    assert out.logits.shape == (2, inc.NUM_LOGITS) == (2, 1008)
    pool, mixed_6d, logits_biased = torch_reference(state_dict, images)
    spatial = mixed_6d[:, :7].transpose(0, 2, 3, 1).reshape(2, -1)        # NHWC flatten, as TF's reshape
    logits = pool @ state_dict["fc.weight"].T                             # the evaluator: no bias
    for got, want in ((out.pool, pool), (out.spatial, spatial), (out.logits, logits)):
        assert np.abs(want).max() > 0.1                                   # activations did not vanish
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    fc = {"params": variables["params"]["fc"]}
    biased = inc.Logits(use_bias=True).apply(fc, out.pool)                # logits_bias=True: pytorch-fid's fc
    np.testing.assert_allclose(np.asarray(biased), logits_biased, rtol=1e-4, atol=1e-4 * np.abs(logits_biased).max())


# --- converter ---------------------------------------------------------------------------------------------
def test_expected_keys_are_pytorch_fids(state_dict):
    want = {k: v.shape for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    got = conv_mod.expected_state_dict_shapes()
    assert got == want
    assert len(got) == 472                                    # pytorch-fid's FID Inception without BN counters
    assert sum(int(np.prod(s)) for s in got.values()) == 23_885_392


def test_convert_maps_every_tensor_transposed(state_dict, variables):
    params, stats = variables["params"], variables["batch_stats"]
    assert set(variables) == {"params", "batch_stats"}
    for name, *_ in CONVS:
        *path, = name.split(".")
        node_p, node_s = params, stats
        for p in path:
            node_p, node_s = node_p[p], node_s[p]
        np.testing.assert_array_equal(node_p["conv"]["kernel"],
                                      state_dict[f"{name}.conv.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(node_p["bn"]["scale"], state_dict[f"{name}.bn.weight"])
        np.testing.assert_array_equal(node_p["bn"]["bias"], state_dict[f"{name}.bn.bias"])
        np.testing.assert_array_equal(node_s["bn"]["mean"], state_dict[f"{name}.bn.running_mean"])
        np.testing.assert_array_equal(node_s["bn"]["var"], state_dict[f"{name}.bn.running_var"])
    np.testing.assert_array_equal(params["fc"]["kernel"], state_dict["fc.weight"].T)
    np.testing.assert_array_equal(params["fc"]["bias"], state_dict["fc.bias"])
    n_leaves = len(jax.tree.leaves(variables))
    assert n_leaves == 472


def test_convert_accepts_torch_tensors_without_counters():
    sd = random_state_dict(seed=5, with_counters=False)
    tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
    out = conv_mod.convert_state_dict(tensors)
    np.testing.assert_array_equal(out["params"]["Mixed_6d"]["branch1x1"]["conv"]["kernel"],
                                  sd["Mixed_6d.branch1x1.conv.weight"].transpose(2, 3, 1, 0))


def test_convert_lists_every_problem(state_dict):
    bad = dict(state_dict)
    del bad["Mixed_7c.branch_pool.bn.running_var"]
    bad["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3), np.float32)
    bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    with pytest.raises(ConversionError) as err:
        conv_mod.convert_state_dict(bad)
    msg = str(err.value)
    assert "3 problems" in msg
    assert "missing key 'Mixed_7c.branch_pool.bn.running_var'" in msg
    assert "shape mismatch for 'Mixed_5b.branch1x1.conv.weight': checkpoint (64, 192, 3, 3)" in msg
    assert "unexpected key 'AuxLogits.fc.weight'" in msg


def test_cli_converts_pth_and_loader_round_trips(tmp_path, state_dict, variables):
    pth = tmp_path / "pt_inception.pth"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, pth)
    out = tmp_path / "ckpt" / "inception"
    conv_mod.main(["--pth", str(pth), "--out", str(out)])
    assert sorted(os.listdir(out.parent)) == ["inception"]                 # no staging directory left
    loaded = conv_mod.load_variables(str(out))
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, variables))
    with pytest.raises(SystemExit):                                        # refuses to overwrite
        conv_mod.main(["--pth", str(pth), "--out", str(out)])


def test_failed_conversion_leaves_nothing(tmp_path, state_dict):
    bad = {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items() if k != "fc.bias"}
    pth = tmp_path / "bad.pth"
    torch.save(bad, pth)
    out = tmp_path / "out" / "inception"
    with pytest.raises(ConversionError, match="missing key 'fc.bias'"):
        conv_mod.convert_file(str(pth), str(out))
    assert not out.exists()
    with pytest.raises(ValueError, match="no weight file"):
        conv_mod.convert_file(str(tmp_path / "absent.pth"), str(out))
    assert not out.exists()


def test_save_failure_mid_write_leaves_nothing(tmp_path, variables, monkeypatch):
    def broken_save(self, directory, *args, **kwargs):
        os.makedirs(directory)
        open(os.path.join(directory, "partial"), "w").close()
        raise OSError("disk full")

    monkeypatch.setattr(conv_mod.ocp.Checkpointer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        conv_mod.save_variables(variables, str(tmp_path / "inception"))
    assert os.listdir(tmp_path) == []


def test_save_and_load_reject_wrong_variables(tmp_path, variables):
    wrong = jax.tree.map(lambda a: a, variables)
    wrong["params"] = dict(wrong["params"])
    wrong["params"]["fc"] = {"kernel": np.zeros((2048, 1000), np.float32), "bias": np.zeros(1000, np.float32)}
    with pytest.raises(ConversionError, match="shape mismatch at params/fc/kernel"):
        conv_mod.save_variables(wrong, str(tmp_path / "x"))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="no Inception checkpoint"):
        conv_mod.load_variables(str(tmp_path / "absent"))
