"""experiments.quantize end to end on the embedded default (small budget), the checkpoint round trip, bad input."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from varq_jax import checkpoint, default_model, sampling
from varq_jax.quant import export, state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.calib.num_samples=4", "--config.calib.batch_size=4", "--config.samples.num=2",
         "--config.dtype=float32", "--config.theta.n_grids=1000"]


def _quantize(workdir, *args):
    cmd = [sys.executable, "-m", "experiments.quantize", f"--workdir={workdir}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("q") / "w4a6"
    r = _quantize(wd, "--config=w4a6:baseline", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    return wd


def test_outputs_and_report(baseline_run):
    wd = baseline_run
    for f in ("report.json", "report.md", "samples.png", "model"):
        assert os.path.exists(wd / f), f
    import json
    rep = json.load(open(wd / "report.json"))
    assert set(rep["stages"]) >= {"calibration", "init", "samples", "total"}
    assert rep["bops"]["quantized"] < rep["bops"]["fp16"] < rep["bops"]["fp32"]
    assert all(0 < e < 1 for e in rep["weight_errors"].values()) and rep["activation_errors"]


def test_checkpoint_round_trip_gives_the_same_images(baseline_run):
    """The saved integer codes + scales reproduce the in-memory quantized model's samples exactly. Two images, as in
    the run's comparison grid: the sampler the CLI compiled comes back from the session's compilation cache."""
    ck = export.load_quantized(str(baseline_run / "model"))
    fp = default_model.load_model(None)
    pol = ck.policy
    assert pol is not None and (pol.w_bits, pol.a_bits) == (4, 6)
    quant = state.init_quant_state(fp.params["var"], pol)
    quant = state.set_theta(quant, state.get_theta(ck.quant))
    settings = sampling.SamplingConfig(1.5, min(900, ck.var_cfg.vocab_size), 0.96)
    labels, key = np.array([0, 1]), jax.random.PRNGKey(3)
    mem, _ = sampling.Sampler(fp.vae_cfg, fp.var_cfg, settings, jnp.float32, pol)(fp.params, labels, key, quant=quant)
    disk, _ = sampling.Sampler(ck.vae_cfg, ck.var_cfg, settings, jnp.float32, pol)(ck.params, labels, key,
                                                                                     quant=ck.quant)
    np.testing.assert_array_equal(np.asarray(mem), np.asarray(disk))


def test_w4_codes_are_packed(baseline_run):
    raw = checkpoint.read_metadata(str(baseline_run / "model"))
    sites = raw["quantized"]["sites"]
    assert raw["quantized"]["policy"]["w_bits"] == 4 and raw["items"] == ["codes", "quant"]
    assert {s["bits"] for s in sites.values()} == {4}
    n = sum(int(np.prod(s["shape"])) for s in sites.values())
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(baseline_run / "model" / "ckpt" / "codes")
               for f in fs)
    assert size < n * 2 / 3      # below bf16 by well over 3× (≈ 4× plus per-file overhead)


@pytest.mark.parametrize("args, message", [
    (["--config=w3a5"], "unknown config preset 'w3a5'"),
    (["--config=w4a6", "--config.no_such_field=1"], "unknown config field(s) no_such_field"),
    (["--config=w4a6", "--config.w_bits=1"], "bits must be an int in [2, 8]"),
])
def test_cli_bad_input_stops_before_writing(tmp_path, args, message):
    wd = tmp_path / "out"
    r = _quantize(wd, *args)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert not wd.exists()


@pytest.mark.parametrize("override, checkpoint_path, message", [
    ({"a_bits": 9}, None, "bits must be an int in [2, 8]"),
    ({"w_bits": 1}, None, "bits must be an int in [2, 8]"),
    ({"theta.n_grids": 0}, None, "theta.n_grids must be an int >= 2"),
    ({"theta.n_grids": -5}, None, "theta.n_grids must be an int >= 2"),
    ({"fp_modules": ("nosuch",)}, None, "'nosuch' match no module"),
    ({"recon.iters": 0}, None, "recon.iters must be a positive int"),
    ({}, "/nonexistent/ckpt", "does not exist"),
])
def test_bad_config_stops_before_writing(tmp_path, override, checkpoint_path, message):
    from varq_jax import cli
    from varq_jax.runs import quantize as workflow
    config = cli.load_config(cli.resolve_config("w4a6"))
    for k, v in override.items():
        sub = config
        *parents, leaf = k.split(".")
        for p in parents:
            sub = sub[p]
        sub[leaf] = v
    wd = tmp_path / "out"
    with pytest.raises((ValueError, checkpoint.CheckpointError), match=message.replace("[", r"\[").replace("]", r"\]")):
        workflow.quantize_command(config, checkpoint_path, str(wd), log=lambda *a: None)
    assert not wd.exists()


@pytest.mark.parametrize("module, args, message", [
    ("quantize", ["--config=w4a6", "stray"], "error: unexpected arguments 'stray'"),
    ("sample", ["--config.num=0"], "error: config.num must be a positive number of images"),
    ("sample", ["--config.box=0.1,0.2,0.3"], "error: config.box must be four fractions"),
    ("sample", ["--num=3"], "error: --num is now --config.num"),
    ("sample", ["--config.nosuch=3"], "error: unknown config field(s) nosuch"),
    ("evaluate", ["--seed=1"], "error: --seed is now --config.seed"),
    ("evaluate", ["--checkpoint=/nonexistent/ck", "--checkpoints=a,b"], "error: give --checkpoint or --checkpoints"),
    ("sample", ["--checkpoint=/nonexistent/ck"], "error: checkpoint directory '/nonexistent/ck' does not exist"),
    ("evaluate", ["--config=configs/eval.py:ablate,resarch"], "error: unknown eval config argument 'resarch'"),
])
def test_cli_user_errors_are_one_line(tmp_path, module, args, message):
    r = subprocess.run([sys.executable, "-m", f"experiments.{module}", f"--out={tmp_path / 'o'}"
                        if module in ("sample", "evaluate") else f"--workdir={tmp_path / 'o'}", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_eval_config_variants_compose():
    from configs import eval as eval_config
    base, both = eval_config.get_config(), eval_config.get_config("ablate,research")
    assert (both.num_images, both.top_p) == (1000, 0.5) and (base.num_images, base.top_p) == (0, 0.96)
    assert eval_config.get_config("research").num_images == 0 and both.top_k == base.top_k
