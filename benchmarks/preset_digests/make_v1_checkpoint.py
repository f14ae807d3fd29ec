import jax, numpy as np, jax.numpy as jnp, os, shutil
from varq_jax import checkpoint, sampling
from varq_jax.models import zoo
from varq_jax.models.build import init_params
from varq_jax.quant import state
from varq_jax.quant.policy import QuantPolicy
import dataclasses
vae_cfg, var_cfg = zoo.tiny((1, 2, 3), depth=2, width=128, vocab_size=32)
vae_cfg = dataclasses.replace(vae_cfg, ch_mult=(1, 1, 1, 1, 1), dropout=0.0) if hasattr(vae_cfg, "dropout") else dataclasses.replace(vae_cfg, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, using_sa=False, using_mid_sa=False)
params = init_params(vae_cfg, var_cfg, jax.random.PRNGKey(1))
ck = checkpoint.ModelCheckpoint(vae_cfg, var_cfg, params, {"name": "tiny v1 fixture"})
policy = QuantPolicy(w_bits=4, a_bits=6, fp_modules=("head",))
quant = state.set_theta(state.init_quant_state(params["var"], policy), 0.05)
out = "/tmp/v1_quantized"
shutil.rmtree(out, ignore_errors=True)
checkpoint.save_quantized(out, ck, params["var"], quant, policy, meta={"note": "written by c96d680 (format v1)"})
settings = sampling.SamplingConfig(1.5, 16, 0.9)
loaded = checkpoint.load(out)
imgs, toks = sampling.Sampler(vae_cfg, var_cfg, settings, jnp.float32, loaded.policy)(loaded.params, np.array([0, 1]), jax.random.PRNGKey(0), quant=loaded.quant)
np.savez(out + "_expected.npz", images=np.asarray(imgs), **{f"tokens_{i}": np.asarray(t) for i, t in enumerate(toks)},
         **{"var_" + "/".join(map(str, k)): np.asarray(v) for k, v in []})
print(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs))
