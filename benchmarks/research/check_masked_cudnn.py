"""GPU check: cuDNN fused attention under VAR's block-causal mask against the XLA path (outputs and gradients,
bf16 inputs at the research model's shapes). Prints the largest differences relative to the outputs' scale."""
import jax
import jax.numpy as jnp
import numpy as np

from varq_jax.models.var import VARConfig, attention

cfg = VARConfig(depth=12, width=128, heads=4, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), num_classes=100,
                vocab_size=1024, cvae=32)
mask = jnp.asarray(cfg.block_causal_mask())
L = mask.shape[0]
q, k, v = (jax.random.normal(jax.random.key(i), (8, L, 4, 32), jnp.float32).astype(jnp.bfloat16) for i in range(3))
scale = 32 ** -0.5
xla = lambda q, k, v: attention(q, k, v, scale, mask)
cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask[None, None],
                                                     implementation="cudnn")
loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * v.astype(jnp.float32)))
a, b = jax.jit(xla)(q, k, v), jax.jit(cudnn)(q, k, v)
ga, gb = jax.jit(jax.grad(loss(xla), (0, 1, 2)))(q, k, v), jax.jit(jax.grad(loss(cudnn), (0, 1, 2)))(q, k, v)
rel = lambda x, y: float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))
                         / jnp.max(jnp.abs(x.astype(jnp.float32))))
print(f"output max |diff| / max |out|: {rel(a, b):.2e}")
for n, x, y in zip("qkv", ga, gb):
    print(f"grad d{n} max |diff| / max |grad|: {rel(x, y):.2e}")
print("bf16 epsilon:", float(jnp.finfo(jnp.bfloat16).eps))
