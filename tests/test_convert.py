"""convert_torch_weights.py on bad input: a clear error naming the problem, and no output left behind."""
import os

import numpy as np
import pytest
import torch

import convert_torch_weights
from test_generate import random_like
from varq_jax import checkpoint, torch_mapping
from varq_jax.models import zoo

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "var_tiny_l2attn")


def _sd(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _convert(tmp_path, vae, var, capsys, extra=()):
    out = tmp_path / "out"
    rc = convert_torch_weights.main(["--vae", str(vae), "--var", str(var), "--out", str(out), *extra])
    return rc, out, capsys.readouterr().err


def _assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in os.listdir(out.parent) if p.startswith(".out.partial")]


def _write(tmp_path, name, sd):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_truncated_file(tmp_path, capsys):
    data = open(FIX + ".var.pth", "rb").read()
    bad = tmp_path / "trunc.pth"
    bad.write_bytes(data[: len(data) // 2])
    rc, out, err = _convert(tmp_path, FIX + ".vae.pth", bad, capsys)
    assert rc == 2 and "trunc.pth" in err and "truncated" in err
    _assert_nothing_written(out)


def test_missing_key(tmp_path, capsys):
    sd = _sd(FIX + ".var.pth")
    del sd["blocks.1.ffn.fc2.bias"]
    rc, out, err = _convert(tmp_path, FIX + ".vae.pth", _write(tmp_path, "v.pth", sd), capsys)
    assert rc == 2 and "missing key 'blocks.1.ffn.fc2.bias'" in err
    _assert_nothing_written(out)


def test_extra_key(tmp_path, capsys):
    sd = _sd(FIX + ".vae.pth")
    sd["decoder.extra_conv.weight"] = torch.zeros(3, 3)
    rc, out, err = _convert(tmp_path, _write(tmp_path, "a.pth", sd), FIX + ".var.pth", capsys)
    assert rc == 2 and "unexpected key 'decoder.extra_conv.weight'" in err
    _assert_nothing_written(out)


def test_wrong_shape_lists_every_problem(tmp_path, capsys):
    sd = _sd(FIX + ".var.pth")
    sd["blocks.0.attn.proj.weight"] = torch.zeros(128, 127)
    del sd["head.bias"]
    rc, out, err = _convert(tmp_path, FIX + ".vae.pth", _write(tmp_path, "v.pth", sd), capsys)
    assert rc == 2
    assert "shape mismatch for 'blocks.0.attn.proj.weight': checkpoint (128, 127), model expects (128, 128)" in err
    assert "missing key 'head.bias'" in err
    _assert_nothing_written(out)


def test_existing_output_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = _convert(tmp_path, FIX + ".vae.pth", FIX + ".var.pth", capsys)
    assert rc == 2 and "already exists" in err and (out / "keep.txt").read_text() == "mine"


def test_bfloat16_and_detection(tmp_path, capsys):
    rc, out, _ = _convert(tmp_path, FIX + ".vae.pth", FIX + ".var.pth", capsys, ["--dtype", "bfloat16"])
    assert rc == 0
    ck = checkpoint.load(str(out))
    assert ck.meta["dtype"] == "bfloat16" and ck.meta["provenance"]["var_file"] == "var_tiny_l2attn.var.pth"
    assert ck.var_cfg.attn_l2_norm and not ck.var_cfg.shared_aln and ck.var_cfg.patch_nums == (1, 2, 3, 4)


def test_detects_plain_attention_and_shared_aln():
    """Keys decide attn_l2_norm (scale_mul_1H11) and shared_aln (shared_ada_lin), as for d24 and d36."""
    for l2, shared in ((False, False), (True, True)):
        vae_cfg, var_cfg = zoo.tiny((1, 2, 3, 5), attn_l2_norm=l2, shared_aln=shared)
        from varq_jax.models.build import abstract_params
        import jax
        params = random_like(abstract_params(vae_cfg, var_cfg))      # NumPy's values: Flax's init is slow eagerly
        var_sd = torch_mapping.params_to_state_dict(params["var"], torch_mapping.var_torch_key)
        vae_sd = torch_mapping.params_to_state_dict(params["vae"], lambda p: torch_mapping.vae_torch_key(p, vae_cfg))
        assert ("blocks.0.attn.scale_mul_1H11" in var_sd) == l2 and ("shared_ada_lin.1.weight" in var_sd) == shared
        got_vae, got_var, got = torch_mapping.convert_state_dicts(vae_sd, var_sd)
        assert got_var == var_cfg and got_vae == vae_cfg
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_patch_nums_inference():
    assert torch_mapping.infer_patch_nums(680, 10) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert torch_mapping.infer_patch_nums(2240, 10) == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    assert torch_mapping.infer_patch_nums(39, 4) == (1, 2, 3, 5)
    with pytest.raises(torch_mapping.ConversionError, match="--patch-nums"):
        torch_mapping.infer_patch_nums(31, 4)


def test_released_key_counts():
    """The Flax trees map onto exactly the documented official key counts (minus recomputed buffers)."""
    from varq_jax.models.build import abstract_params
    from flax import traverse_util
    expected = {"d16": 220, "d20": 272, "d30": 402, "d36": 446}
    for name, n_keys in expected.items():
        vae_cfg, var_cfg = zoo.preset(name)
        shapes = abstract_params(vae_cfg, var_cfg)
        n = len(traverse_util.flatten_dict(shapes["var"]))
        buffers = 2 + var_cfg.depth      # lvl_1L, attn_bias_for_masking, zero_k_bias per block
        assert n + buffers == n_keys, name
        assert len(traverse_util.flatten_dict(shapes["vae"])) + 1 == 324    # + quantize.ema_vocab_hit_SV


def test_load_straight_onto_a_mesh(tmp_path, capsys):
    """A converted checkpoint restored with a sharding lands on every device of an 8-device mesh."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    rc, out, _ = _convert(tmp_path, FIX + ".vae.pth", FIX + ".var.pth", capsys)
    assert rc == 0
    mesh = Mesh(np.array(jax.devices()).reshape(-1), ("data",))
    assert mesh.devices.size == 8
    ck = checkpoint.load(str(out), sharding=NamedSharding(mesh, P()))
    leaf = ck.params["var"]["head"]["kernel"]
    assert isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(NamedSharding(mesh, P()), leaf.ndim)
    assert len(leaf.sharding.device_set) == 8
    plain = checkpoint.load(str(out))
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(plain.params["var"]["head"]["kernel"]))
