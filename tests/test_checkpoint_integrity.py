"""Checkpoints verify what they read: array checksums, non-finite weights refused (with an opt-out), a quantized
checkpoint refused where a full-precision one is needed."""
import dataclasses
import os

import jax
import numpy as np
import pytest
import torch

import convert_torch_weights
from test_generate import random_like
from varq_jax import checkpoint
from varq_jax.models import zoo
from varq_jax.models.build import abstract_params
from varq_jax.runs import quantize as workflow

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
VAE_CFG, VAR_CFG = zoo.tiny((1, 2, 3), depth=2, width=128, vocab_size=32)
VAE_CFG = dataclasses.replace(VAE_CFG, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, using_sa=False, using_mid_sa=False)


@pytest.fixture(scope="module")
def params():
    """Any values do (NumPy's random ones: Flax's init runs the model's forward eagerly, ~15 s on a CPU)."""
    return random_like(abstract_params(VAE_CFG, VAR_CFG))


def _largest_file(root) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def test_flipped_bytes_are_a_clear_error(params, tmp_path):
    path = checkpoint.save(str(tmp_path / "ck"), VAE_CFG, VAR_CFG, params)
    assert checkpoint.read_metadata(path)["checksums"]["params/var/head/kernel"]
    data_file = _largest_file(os.path.join(path, "ckpt", "params"))
    raw = bytearray(open(data_file, "rb").read())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0x5A for b in raw[mid:mid + 64])
    open(data_file, "wb").write(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match=r"corrupt: array 'params/.*' does not match|cannot restore"):
        checkpoint.load(path)


def test_a_wrong_value_names_its_array(params, tmp_path):
    path = checkpoint.save(str(tmp_path / "ck"), VAE_CFG, VAR_CFG, params)
    meta_file = os.path.join(path, "ckpt", "metadata", "metadata")
    text = open(meta_file).read()
    key = "params/var/blocks_1/ffn/fc2/kernel"
    want = checkpoint.read_metadata(path)["checksums"][key]
    open(meta_file, "w").write(text.replace(want, "0" * 64))     # as if the array's bytes had changed
    with pytest.raises(checkpoint.CheckpointError, match=f"array '{key}' does not match the checksum"):
        checkpoint.load(path)


def test_non_finite_weights_are_refused_unless_allowed(params, tmp_path):
    bad = jax.tree.map(np.copy, params)
    bad["var"]["blocks_0"]["attn"]["proj"]["kernel"][0, 0] = np.nan
    with pytest.raises(checkpoint.CheckpointError, match="params/var/blocks_0/attn/proj/kernel"):
        checkpoint.save(str(tmp_path / "nan"), VAE_CFG, VAR_CFG, bad)
    assert not (tmp_path / "nan").exists()
    path = checkpoint.save(str(tmp_path / "nan"), VAE_CFG, VAR_CFG, bad, allow_nonfinite=True)
    with pytest.raises(checkpoint.CheckpointError, match="non-finite values .* params/var/blocks_0/attn/proj/kernel"):
        checkpoint.load(path)
    ck = checkpoint.load(path, allow_nonfinite=True)
    assert np.isnan(ck.params["var"]["blocks_0"]["attn"]["proj"]["kernel"][0, 0])


def test_conversion_refuses_a_nan_weight(tmp_path, capsys):
    fix = os.path.join(FIXTURES, "var_tiny_l2attn")
    sd = torch.load(fix + ".var.pth", map_location="cpu", weights_only=True)
    sd["blocks.0.ffn.fc1.weight"][3, 4] = float("nan")
    var = tmp_path / "var.pth"
    torch.save(sd, var)
    out = tmp_path / "out"
    rc = convert_torch_weights.main(["--vae", fix + ".vae.pth", "--var", str(var), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "params/var/blocks_0/ffn/fc1/kernel" in err and "--allow-nonfinite" in err
    assert not out.exists()


def test_a_quantized_checkpoint_is_not_taken_for_a_full_precision_one():
    path = os.path.join(FIXTURES, "v1_quantized_tiny")
    with pytest.raises(checkpoint.CheckpointError, match="is a quantized checkpoint: load it with"):
        checkpoint.load(path)
    from configs import ptq
    with pytest.raises(ValueError, match="already a quantized checkpoint"):
        workflow.quantize_command(ptq.make(4, 6, "baseline"), path, "/nonexistent/never-written", log=lambda *_: None)
