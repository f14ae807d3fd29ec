"""Checkpoints and reconstruction state are addressed by relative paths too (Orbax itself wants absolute ones);
the GPU graph flags are added once and respect the user's own setting."""
import jax
import numpy as np

from test_generate import random_like
from varq_jax import checkpoint, cli
from varq_jax.models import zoo
from varq_jax.models.build import abstract_params
from varq_jax.quant import recon_state


def test_save_and_load_by_relative_path(tmp_path, monkeypatch):
    vae_cfg, var_cfg = zoo.tiny()
    params = random_like(abstract_params(vae_cfg, var_cfg))      # any values: NumPy's, not Flax's slow init
    monkeypatch.chdir(tmp_path)
    checkpoint.save("runs/model", vae_cfg, var_cfg, params, meta={"note": "relative"})
    ck = checkpoint.load("runs/model")
    assert ck.meta["note"] == "relative"
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ck.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reconstruction_state_by_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quant = {"blocks_0": {"fc": {"alpha": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
    recon_state.save("state/recon", quant, np.array([0, 1], np.uint32), ["blocks_0/fc"], [{"module": "blocks_0/fc"}],
                     {"units": ["blocks_0/fc"]})
    saved = recon_state.load_latest("state/recon")
    assert saved["done"] == ["blocks_0/fc"]
    np.testing.assert_array_equal(np.asarray(saved["quant"]["blocks_0"]["fc"]["alpha"]),
                                  quant["blocks_0"]["fc"]["alpha"])


def test_configure_xla_adds_graph_flags_once(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.delenv("VARQ_GPU_GRAPHS", raising=False)
    cli.configure_xla()
    cli.configure_xla()
    import os
    flags = os.environ["XLA_FLAGS"]
    assert flags.startswith("--xla_dump_to=/tmp/x ") and flags.count("xla_gpu_enable_command_buffer") == 1
    assert "WHILE" in flags


def test_configure_xla_respects_user_and_opt_out(monkeypatch):
    import os
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")
    cli.configure_xla()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_command_buffer="
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("VARQ_GPU_GRAPHS", "0")
    cli.configure_xla()
    assert os.environ["XLA_FLAGS"] == ""
