"""Runs you can trust: a PTQ workdir's stages carry the fingerprint of what made them — resumed when it fits,
refused (naming the fields) when it does not, discarded with restart, locked while being made, and a calibration
set shared between runs verified on use. In-process with a small budget on a saved tiny random-weight checkpoint
(test_generate's, as in test_ablation: the stages are tested, not the model; a full PTQ of the shipped model
compiles its programs for over a minute on a 2-core CPU); the teacher-forced probabilities on the shipped model."""
import json
import os
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ptq
from test_generate import small_model
from varq_jax import checkpoint, default_model, fingerprint, sampling
from varq_jax.quant import calibration, export
from varq_jax.runs import quantize as quantize_run
from varq_jax.runs.store import StageStore, StaleStateError

PATCH_NUMS = small_model().var_cfg.patch_nums          # one frequency-mismatch entry per scale


def _config(method="baseline", **overrides):
    c = ptq.make(4, 6, method)
    c.calib.num_samples, c.calib.batch_size, c.samples.num, c.dtype, c.theta.n_grids = 4, 4, 0, "float32", 1000
    c.recon.iters, c.recon.units = 4, ("blocks_0/ffn", "head")     # two units: the stage, not BRECQ, is tested
    for k, v in overrides.items():
        sub = c
        *parents, leaf = k.split(".")
        for p in parents:
            sub = sub[p]
        sub[leaf] = v
    return c


class Log(list):
    def __call__(self, *a):
        self.append(" ".join(str(x) for x in a))

    def text(self) -> str:
        return "\n".join(self)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The model every run here quantizes: test_generate's tiny random-weight model, saved (a --checkpoint)."""
    path = str(tmp_path_factory.mktemp("model") / "tiny")
    m = small_model()
    checkpoint.save(path, m.vae_cfg, m.var_cfg, m.params, meta=m.meta)
    return path


def _quantize(config, workdir, model_dir, **kw):
    log = Log()
    report = quantize_run.quantize_command(config, model_dir, str(workdir), log=log, **kw)
    return report, log


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, model_dir):
    wd = tmp_path_factory.mktemp("runs") / "w4a6_full"
    report, _ = _quantize(_config("full"), wd, model_dir)
    return wd, report


def _codes(wd):
    return jax.tree.leaves(export.load_quantized(str(wd / "model")).params["var"])


def test_full_method_small_budget(full_run):
    """Calibration, θ, resampling, reconstruction of every unit, θ again; each stage kept with its fingerprint."""
    wd, rep = full_run
    assert set(rep["stages"]) >= {"calibration", "init", "theta", "resampling", "reconstruction", "theta_after"}
    units = rep["reconstruction"]["modules"]
    assert set(units) == {"blocks_0/ffn", "head"}
    assert all(u["loss_start"] is not None and u["loss_end"] is not None for u in units.values())
    assert 0 < rep["theta"] <= 1 and len(rep["frequency_mismatch"]["after"]) == len(PATCH_NUMS)
    assert set(rep["fingerprints"]) == {"calibration", "theta", "resampling", "reconstruction", "theta_after"}
    for stage in rep["fingerprints"]:
        assert os.path.isdir(wd / "state" / stage), stage


def test_resume_reuses_every_stage_bit_identically(full_run, model_dir):
    wd, rep = full_run
    before = _codes(wd)
    again, log = _quantize(_config("full"), wd, model_dir)
    for stage in ("calibration", "theta", "resampling", "reconstruction", "theta_after"):
        assert f"[{stage}] reused from the workdir" in log.text(), stage
    assert "blocks_0/ffn" not in log.text()                           # no unit reconstructed again
    assert again["theta"] == rep["theta"] and again["frequency_mismatch"] == rep["frequency_mismatch"]
    for a, b in zip(before, _codes(wd)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method, overrides, named", [
    ("full", {"calib.num_samples": 8}, "calib.num_samples: 4 there, 8 now"),
    ("full", {"calib.seed": 7}, "calib.seed: 2025 there, 7 now"),
    ("full", {"recon.iters": 5}, "recon.iters: 4 there, 5 now"),
    ("full", {"a_bits": 8}, "a_bits: 6 there, 8 now"),
    ("brecq_resample", {}, "shift_and_sum: true there, false now"),
])
def test_other_settings_are_refused_before_any_work(full_run, model_dir, method, overrides, named):
    wd, _ = full_run
    stamps = {f: os.path.getmtime(wd / f) for f in ("report.json", "model")}
    with pytest.raises(StaleStateError, match="other settings") as e:
        _quantize(_config(method, **overrides), wd, model_dir)
    assert named in str(e.value) and "--restart" in str(e.value)
    assert stamps == {f: os.path.getmtime(wd / f) for f in stamps}      # nothing rewritten or relabelled


def test_baseline_over_a_full_run_reuses_only_what_fits(full_run, model_dir, tmp_path):
    """A baseline on a copy of the full run's workdir reuses its calibration set (the tokens as sampled, not the
    resampled ones) and neither resamples nor reports resampling."""
    wd = tmp_path / "copy"
    shutil.copytree(full_run[0], wd)
    rep, log = _quantize(_config("baseline"), wd, model_dir)
    assert "[calibration] reused" in log.text() and "resampling" not in rep["stages"]
    assert "frequency_mismatch" not in rep and "reconstruction" not in rep and rep["config"]["method"] == "baseline"


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory, model_dir):
    wd = tmp_path_factory.mktemp("runs") / "w4a6_baseline"
    rep, _ = _quantize(_config("baseline"), wd, model_dir)
    return wd, rep


def test_restart_discards_stale_stages(baseline_run, model_dir, tmp_path):
    wd = tmp_path / "restart"
    shutil.copytree(baseline_run[0], wd)
    with pytest.raises(StaleStateError, match="calib.seed: 2025 there, 3 now"):
        _quantize(_config("baseline", **{"calib.seed": 3}), wd, model_dir)
    rep, log = _quantize(_config("baseline", **{"calib.seed": 3}), wd, model_dir, restart=True)
    assert "discarding stale stage 'calibration'" in log.text() and rep["config"]["calib"]["seed"] == 3
    labels = export.load_quantized(str(wd / "model"))       # the new model was written
    assert labels.policy is not None
    rec = StageStore(str(wd / "state")).record("calibration")
    assert rec["fingerprint"]["calib.seed"] == 3 and rec["versions"]["jax"] == jax.__version__


def test_a_shared_calibration_set_is_verified_and_used(baseline_run, model_dir, tmp_path):
    src = baseline_run[0]
    # another method takes the set, resampling on: its probabilities are recomputed teacher-forced
    rep, log = _quantize(_config("baseline", resampling=True, **{"calib.num_samples": 16}), tmp_path / "shared",
                         model_dir, calibration=str(src))
    assert "its settings replace the config's" in log.text() and "teacher-forced" in log.text()
    assert rep["config"]["calib"]["num_samples"] == 4 and rep["config"]["calibration_from"].endswith("calibration")
    assert rep["fingerprints"]["calibration"] == baseline_run[1]["fingerprints"]["calibration"]
    assert len(rep["frequency_mismatch"]["after"]) == len(PATCH_NUMS)
    # a shared set whose tokens no longer match their recorded checksum is refused, naming the array
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    meta_file = bad / "state" / "calibration" / "ckpt" / "meta" / "metadata"
    meta = json.load(open(meta_file))
    meta["checksums"]["arrays/tokens/2"] = "0" * 64
    json.dump(meta, open(meta_file, "w"))
    with pytest.raises(ValueError, match=r"corrupt: array 'arrays/tokens/2' does not match"):
        _quantize(_config("baseline"), tmp_path / "other", model_dir, calibration=str(bad))
    assert not (tmp_path / "other" / "model").exists()
    with pytest.raises(ValueError, match="holds no calibration set"):
        _quantize(_config("baseline"), tmp_path / "other2", model_dir, calibration=str(tmp_path))


def test_teacher_forced_probabilities_equal_the_sampling_time_ones():
    """What resampling uses for a set from disk equals what sampling drew from (the runs' own programs: the
    default model, the runs' calibration settings)."""
    ck = default_model.load_model()
    s = sampling.SamplingConfig(1.5, min(900, ck.var_cfg.vocab_size), 0.96)
    labels = calibration.calibration_labels(4, ck.var_cfg.num_classes, 2025)
    with jax.default_matmul_precision("highest"):
        cal = calibration.generate_calibration(ck.vae_cfg, ck.var_cfg, ck.params, labels, 2025, s, 4, jnp.float32)
        tf = calibration.teacher_forced_probs(ck.vae_cfg, ck.var_cfg, ck.params, labels, cal.tokens, s, 4,
                                              jnp.float32)
    for a, b in zip(cal.probs, tf):
        np.testing.assert_array_equal(np.asarray(a) > 0, np.asarray(b) > 0)       # the same top-k/top-p support
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


# --- the store itself: locks, partial state, fingerprints --------------------------------------------------------
def test_a_second_run_waits_for_the_lock_then_reuses(tmp_path):
    fp = fingerprint.fingerprint(calib={"seed": 1})
    made, logs = [], []

    def run(name):
        store = StageStore(str(tmp_path), log=logs.append, poll_s=0.05)
        got = store.get("calibration", fp)
        if got is None:
            with store.making("calibration", fp):
                got = store.get("calibration", fp)
                if got is None:
                    time.sleep(0.5)
                    made.append(name)
                    store.put("calibration", fp, {"x": np.arange(3)}, {"by": name})
    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    threads[0].start()
    time.sleep(0.1)
    threads[1].start()
    for t in threads:
        t.join()
    assert made == ["a"] and any("being made by pid" in m for m in logs)
    arrays, result = StageStore(str(tmp_path)).get("calibration", fp)
    assert result == {"by": "a"} and list(arrays["x"]) == [0, 1, 2]


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    import socket
    with open(tmp_path / "theta.lock", "w") as f:
        json.dump({"host": socket.gethostname(), "pid": 2 ** 22 + 12345, "since": 0}, f)
    logs = []
    store = StageStore(str(tmp_path), log=logs.append, poll_s=0.01)
    with store.making("theta", {"a": 1}):
        pass
    assert any("left by a stopped run" in m for m in logs) and not (tmp_path / "theta.lock").exists()


def test_partial_state_is_checked_like_a_finished_stage(tmp_path):
    store = StageStore(str(tmp_path), log=lambda *_: None)
    with store.making("reconstruction", {"recon.iters": 4}):
        pass                                                        # interrupted: only partial state
    with pytest.raises(StaleStateError, match="recon.iters: 4 there, 5 now"):
        store.reconcile({"reconstruction": {"recon.iters": 5}})
    assert store.reconcile({"reconstruction": {"recon.iters": 5}}, restart=True) == ["reconstruction"]
    assert store.record("reconstruction") is None


def test_one_fingerprint_helper():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert fingerprint.array_digest(a) == fingerprint.array_digest(a.astype(jnp.bfloat16))   # dtype-canonical
    assert fingerprint.tree_digest({"w": a}) != fingerprint.tree_digest({"v": a})             # paths count
    fp = fingerprint.fingerprint(calib={"num_samples": 4, "seed": 1}, model="abc", labels=np.arange(3))
    assert fp["calib.num_samples"] == 4 and fp["labels"] == fingerprint.tree_digest(np.arange(3))
    ck = default_model.load_model()
    assert fingerprint.model_digest(ck) == fingerprint.model_digest(default_model.load_model())
