"""Where a research-VAR training step goes (one GPU): data rendering, tokenization, the whole step with the XLA
attention (materialised [B, H, L, L] float32 scores, as trained), and the whole step with cuDNN's fused attention
under the block-causal mask. Prints a table; needs WORKDIR/vqvae/export (the part-1 export)."""
import sys
import time

import jax
import jax.numpy as jnp

from configs import train_research
from varq_jax import data
from varq_jax.models import var as var_lib
from varq_jax.train import optim
from varq_jax.train import var as var_stage


def timed(fn, *args, iters=20):
    out = fn(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters * 1e3


def main(workdir, batch=None):
    config = train_research.get_config()
    if batch:
        config.var.batch_size = int(batch)
    tc = config.var
    cfg = var_stage.model_config(config)
    vae, vae_params = var_stage.load_tokenizer(config, workdir)
    dataset = data.of_config(config)
    idx = jnp.arange(tc.batch_size, dtype=jnp.int32)
    render = jax.jit(lambda i: dataset.make_batch(config.seed, i, image_size=config.image_size))
    tok = jax.jit(lambda p, i: var_stage.tokens(vae, p, render(i)[0]))
    rows = [("render batch", timed(render, idx)), ("render + tokenize", timed(tok, vae_params, idx))]
    tx = optim.make_optimizer(tc.optim, tc.num_steps)
    state = var_stage.init_state(config, cfg, tx)
    plain = var_lib.attention

    def fused(q, k, v, scale, mask=None, kv_len=None):
        if mask is None or jax.default_backend() != "gpu":
            return plain(q, k, v, scale, mask, kv_len)
        return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask[None, None],
                                            implementation="cudnn")

    for name, fn in (("whole step, XLA attention", plain), ("whole step, cuDNN attention + mask", fused)):
        var_lib.attention = fn
        try:
            step = var_stage.make_train_step(config, cfg, vae, vae_params, tx)
            t0 = time.perf_counter()
            jax.block_until_ready(step(state))
            compile_s = time.perf_counter() - t0
            rows.append((f"{name} (compile {compile_s:.0f} s)", timed(lambda s: step(s)[0], state)))
        except Exception as e:                     # report what cuDNN refuses, keep the other rows
            rows.append((f"{name}: failed {type(e).__name__}: {str(e)[:160]}", float("nan")))
        finally:
            var_lib.attention = plain
    print(f"| part (batch {tc.batch_size}, {jax.devices()[0].device_kind}) | ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
