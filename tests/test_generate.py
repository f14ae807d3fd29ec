"""Sharded, resumable generation: device-count independence, real batch splitting, resume after a kill,
corrupt-shard recovery, uneven N and bad input. 8 virtual CPU devices (conftest); a 16-px random model."""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from varq_jax import image_io, parallel, sampling
from varq_jax.checkpoint import ModelCheckpoint
from varq_jax.eval import generate as G
from varq_jax.models import zoo
from varq_jax.models.build import abstract_params
from varq_jax.models.vqvae import VQVAEConfig

N = 21                    # not a multiple of the global batch (8 devices × 2) nor of the shard size
PER_DEVICE, SHARD = 2, 2
SETTINGS = sampling.SamplingConfig(cfg=1.5, top_k=16, top_p=0.96)
DTYPE = jnp.float32
FAST = {"xla_backend_optimization_level": 0}      # halves CPU compile time; every run here uses it


def random_like(abstract, seed: int = 0):
    """Random parameters of the given shapes, drawn in NumPy (Flax's init compiles the model's whole forward:
    ~20 s for the VQVAE on a CPU): kernels N(0, 1/fan_in), norm scales 1, biases 0, embeddings N(0, 1/4)."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(x.shape, np.float32)
        if name == "bias":
            return np.zeros(x.shape, np.float32)
        fan_in = int(np.prod(x.shape[:-1])) if name == "kernel" else 4
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(leaf, abstract)


def small_model() -> ModelCheckpoint:
    """16-px images, three scales, one block: compiles in seconds on a CPU."""
    vae = VQVAEConfig(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, patch_nums=(1, 2, 4),
                      using_sa=False, using_mid_sa=False)
    _, var = zoo.tiny((1, 2, 4), depth=1, width=64, heads=2, vocab_size=32)
    params = random_like(abstract_params(vae, var))
    params["var"]["head"]["kernel"] = params["var"]["head"]["kernel"] * 8      # peaked logits: top-k/p matter
    return ModelCheckpoint(vae, var, params, {"random_weights": True, "description": "test model"})


@pytest.fixture(scope="module")
def model():
    return small_model()


def _generate(model, out, mesh=None, **kw):
    kw = {"num_images": N, "settings": SETTINGS, "per_device_batch": PER_DEVICE, "shard_size": SHARD, "dtype": DTYPE,
          "compiler_options": FAST, "log": lambda s: None, **kw}
    return G.generate_samples(model, str(out), mesh=mesh or parallel.make_mesh(), **kw)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """An uninterrupted 8-device run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    res = _generate(model, out)
    images, labels = G.load_samples(res.samples_path)
    return out, images, labels


def test_eight_devices_equal_the_plain_sampler_on_one_device(model, reference):
    _, images, labels = reference
    assert images.shape == (N, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(N) % 10)
    # One device, no sharding: the plain sampler's image for key fold_in(PRNGKey(seed), i) and label i % 10, run
    # with the batch size of one device above (another batch size may round a float differently).
    sampler = sampling.Sampler(model.vae_cfg, model.var_cfg, SETTINGS, DTYPE)
    plain_generate = jax.jit(functools.partial(sampling.generate, sampler.vae, sampler.var, SETTINGS),
                             compiler_options=FAST)
    idx = np.append(np.arange(N), 0)
    device = jax.devices()[0]
    plain = [plain_generate(jax.device_put(model.params, device), None, jax.device_put(idx[i:i + 2] % 10, device),
                            G.image_keys(0, jax.device_put(idx[i:i + 2], device)))[0]
             for i in range(0, N, PER_DEVICE)]
    assert plain[0].sharding.device_set == {device}
    np.testing.assert_array_equal(image_io.to_uint8(np.concatenate(plain))[:N], images)
    assert len(np.unique(images.reshape(N, -1), axis=0)) > N // 2      # not one image repeated


def test_batch_is_split_over_the_data_axis(model):
    mesh = parallel.make_mesh()
    gen = G.compiled_generator(model.vae_cfg, model.var_cfg, SETTINGS, DTYPE, None, mesh, G.params_spec(model.params),
                               tuple(FAST.items()))
    data = parallel.batch_sharding(mesh)
    b = PER_DEVICE * 8
    args = (parallel.put_tree(model.params, parallel.param_shardings(model.params, mesh)), None,
            parallel.put_global(np.uint32(0), parallel.replicated(mesh)),
            parallel.put_global(np.arange(b, dtype=np.int32) % 10, data),
            parallel.put_global(np.arange(b, dtype=np.int32), data),
            None, None)
    compiled = gen.lower(*args).compile()
    in_shardings = compiled.input_shardings[0]
    labels_sharding, indices_sharding = in_shardings[3], in_shardings[4]
    assert labels_sharding.spec == P("data") and indices_sharding.spec == P("data")
    assert compiled.output_shardings.spec == P("data")
    out = gen(*args)
    assert out.sharding.spec == P("data")
    shards = out.addressable_shards
    assert len(shards) == 8 and {s.device for s in shards} == set(jax.devices())
    assert sorted(s.index[0].start for s in shards) == list(range(0, b, PER_DEVICE))
    assert all(s.data.shape == (PER_DEVICE, 16, 16, 3) for s in shards)


def test_model_axis_shards_the_kernels_and_keeps_the_images(model, reference, tmp_path):
    mesh = parallel.make_mesh(model_parallel=2)            # 4 data × 2 model
    assert dict(mesh.shape) == {"data": 4, "model": 2}
    sh = parallel.param_shardings(model.params, mesh)["var"]["blocks_0"]
    assert sh["attn"]["mat_qkv"]["kernel"].spec == P(None, "model")        # column-parallel
    assert sh["attn"]["proj"]["kernel"].spec == P("model", None)           # row-parallel
    assert sh["ffn"]["fc2"]["kernel"].spec == P("model", None)
    placed = parallel.put_tree(model.params, parallel.param_shardings(model.params, mesh))
    qkv = placed["var"]["blocks_0"]["attn"]["mat_qkv"]["kernel"]
    assert qkv.addressable_shards[0].data.shape == (64, 96)                # [64, 192] split in two
    res = _generate(model, tmp_path / "mp", mesh=mesh)
    np.testing.assert_array_equal(G.load_samples(res.samples_path)[0], reference[1])


def test_unrolled_blocks_give_the_same_set_and_may_resume_a_scanned_run(model, reference, tmp_path):
    res = _generate(model, tmp_path / "unrolled", scan_blocks=False)
    np.testing.assert_array_equal(G.load_samples(res.samples_path)[0], reference[1])
    with open(tmp_path / "unrolled" / G.MANIFEST) as f:
        assert '"scan_blocks": false' in f.read()
    resumed = tmp_path / "resumed"
    shutil.copytree(reference[0], resumed)
    os.remove(G.shard_path(str(resumed), 3))
    logged = []
    res = _generate(model, resumed, scan_blocks=False, log=logged.append)
    assert res.generated == SHARD and any("scan_blocks=True, now False" in line for line in logged), logged
    np.testing.assert_array_equal(G.load_samples(res.samples_path)[0], reference[1])


def test_killed_run_resumes_to_the_identical_set(model, reference, tmp_path):
    out = tmp_path / "killed"
    written = []

    def die_after_three(k):
        written.append(k)
        if len(written) == 3:
            raise KeyboardInterrupt("simulated kill")
    with pytest.raises(KeyboardInterrupt):
        _generate(model, out, on_shard=die_after_three)
    assert not os.path.exists(out / G.SAMPLES)
    assert sorted(os.listdir(out / G.SHARD_DIR)) == [f"shard_{k:05d}.npz" for k in sorted(written)]

    res = _generate(model, out)
    assert res.reused == 3 * SHARD and res.generated == N - 3 * SHARD
    images, labels = G.load_samples(res.samples_path)
    np.testing.assert_array_equal(images, reference[1])
    np.testing.assert_array_equal(labels, reference[2])
    indices = np.concatenate([np.load(out / G.SHARD_DIR / f)["indices"] for f in sorted(os.listdir(out / G.SHARD_DIR))])
    np.testing.assert_array_equal(indices, np.arange(N))                  # no duplicates, no gaps

    again = _generate(model, out)                                          # complete: nothing to do
    assert again.generated == 0 and again.reused == N


def test_corrupt_and_truncated_shards_are_regenerated(model, reference, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(reference[0], out)
    os.remove(out / G.SAMPLES)
    flipped = out / G.SHARD_DIR / "shard_00002.npz"
    raw = bytearray(flipped.read_bytes())
    at = raw.find(reference[1][4:6].tobytes())                # the pixel data (npz entries are stored uncompressed)
    assert at > 0
    raw[at + 100] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    tampered = out / G.SHARD_DIR / "shard_00003.npz"             # a valid zip whose pixels no longer match
    with np.load(tampered) as z:
        data = dict(z)
    data["images"] = data["images"].copy()
    data["images"][0, 0, 0, 0] ^= 1
    np.savez(tampered, **data)
    with pytest.raises(G.ShardError, match="Bad CRC"):               # zip's own CRC catches a flipped byte
        G.read_shard(str(flipped), np.arange(4, 6), np.arange(4, 6) % 10, (16, 16, 3))
    with pytest.raises(G.ShardError, match="checksum mismatch"):
        G.read_shard(str(tampered), np.arange(6, 8), np.arange(6, 8) % 10, (16, 16, 3))
    truncated = out / G.SHARD_DIR / "shard_00005.npz"
    truncated.write_bytes(truncated.read_bytes()[:200])
    last = out / G.SHARD_DIR / "shard_00010.npz"              # the 1-image last shard, rewritten with 2 images
    G.write_shard(str(last), np.zeros((2, 16, 16, 3), np.uint8), np.array([0, 1]), np.array([20, 21]))

    logs = []
    res = _generate(model, out, log=logs.append)
    assert res.regenerated_shards == (2, 3, 5, 10)
    assert res.generated == 2 + 2 + 2 + 1 and res.reused == N - 7
    assert any("checksum mismatch" in m for m in logs) and any("unreadable" in m for m in logs)
    assert any("expected uint8 (1, 16, 16, 3)" in m for m in logs)
    np.testing.assert_array_equal(G.load_samples(res.samples_path)[0], reference[1])


def test_a_corrupt_samples_npz_is_rebuilt_from_valid_shards(model, reference, tmp_path):
    out = tmp_path / "npz"
    shutil.copytree(reference[0], out)
    raw = bytearray((out / G.SAMPLES).read_bytes())
    at = raw.find(reference[1][6:8].tobytes())                # inside arr_0's pixels: the header stays readable
    assert at > 0
    raw[at + 10] ^= 0xFF
    (out / G.SAMPLES).write_bytes(bytes(raw))
    res = _generate(model, out)
    assert res.generated == 0 and res.reused == N
    np.testing.assert_array_equal(G.load_samples(res.samples_path)[0], reference[1])


def test_uneven_n_and_a_batch_larger_than_n(model, reference, tmp_path):
    res = _generate(model, tmp_path / "few", num_images=3)              # one 16-row batch, 3 real rows
    images, labels = G.load_samples(res.samples_path)
    np.testing.assert_array_equal(images, reference[1][:3])
    np.testing.assert_array_equal(labels, [0, 1, 2])


@pytest.mark.parametrize("kwargs, message", [
    ({"per_device_batch": 3, "shard_size": 2}, "must be a positive multiple of shard_size"),
    ({"labels": np.array([0, 11]), "num_images": None}, "labels must lie in"),
    ({"num_images": None}, "give num_images or labels"),
    ({"num_images": 0}, "num_images must be positive"),
])
def test_bad_input_fails_before_any_work(model, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _generate(model, tmp_path / "bad", **kwargs)
    assert not os.path.exists(tmp_path / "bad" / G.MANIFEST)


def test_resume_with_other_settings_is_refused(model, reference, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(reference[0], out)
    with pytest.raises(ValueError, match=r"different sample set \(differs in seed; seed: 0 there, 1 now"):
        _generate(model, out, seed=1)
    with pytest.raises(ValueError, match="differs in num_images, labels_sha256"):
        _generate(model, out, num_images=N + 1)


def test_conditioning_shapes_are_checked(model, tmp_path):
    bad = G.Conditioning(gt_tokens=(np.zeros((N, 1)), np.zeros((N, 4)), np.zeros((N, 15))),
                         keep_mask=np.ones((N, 4, 4)))
    with pytest.raises(ValueError, match=r"scale 2 have shape \(21, 15\), expected \(21, 16\)"):
        _generate(model, tmp_path / "cond", conditioning=bad)


WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
from varq_jax import parallel
pid, port, out, kill_after = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
assert parallel.initialize_distributed("auto", f"localhost:{port}", 2, pid)
sys.path.insert(0, TESTS_DIR)
from test_generate import small_model, SETTINGS, FAST, N, PER_DEVICE, SHARD
from varq_jax.eval import generate as G
written = []
def hook(k):
    written.append(k)
    if len(written) == kill_after:
        os._exit(3)                                    # a hard kill of this host mid-run
G.generate_samples(small_model(), out, num_images=N, settings=SETTINGS, per_device_batch=PER_DEVICE, shard_size=SHARD,
                   dtype=jax.numpy.float32, compiler_options=FAST, on_shard=hook, log=lambda s: None)
print("WROTE", sorted(written))
"""


def _two_processes(out, kill_after=-1):
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    code = WORKER.replace("TESTS_DIR", repr(os.path.dirname(os.path.abspath(__file__))))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(pid), str(port), str(out), str(kill_after)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    return [(p.wait(timeout=600), *p.communicate()) for p in procs]


def _check_two_host_run(results, out, reference):
    [(rc0, out0, err0), (rc1, out1, err1)] = results
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    w0, w1 = eval(out0.split("WROTE")[1]), eval(out1.split("WROTE")[1])
    assert w0 and w1 and not set(w0) & set(w1)                 # each host wrote only its own part
    images, labels = G.load_samples(str(out / G.SAMPLES))
    np.testing.assert_array_equal(images, reference[1])        # = the single-process run
    np.testing.assert_array_equal(labels, reference[2])
    return w0, w1


def test_two_hosts_write_disjoint_shards_of_the_same_set(reference, tmp_path):
    """Two JAX processes (jax.distributed on CPU with gloo collectives), 4 devices each."""
    w0, w1 = _check_two_host_run(_two_processes(tmp_path / "mh"), tmp_path / "mh", reference)
    assert sorted(w0 + w1) == list(range(11))


@pytest.mark.slow      # the same start-up twice (~25 s); the kill/resume logic is the single-host test's
def test_two_hosts_resume_after_one_dies(reference, tmp_path):
    out = tmp_path / "mh"
    [(rc0, _, err0), _] = _two_processes(out, kill_after=2)    # host 0 dies after writing two shards
    assert rc0 == 3, err0[-2000:]
    assert not os.path.exists(out / G.SAMPLES)
    _check_two_host_run(_two_processes(out), out, reference)
