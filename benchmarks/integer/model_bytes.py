"""Bytes of integer models (issue 16): the quantized Linears (codes + scales + zero points + column sums) and the
whole VAR, beside bf16, from shapes alone (jax.eval_shape: no weights are made).

  python benchmarks/integer/model_bytes.py
"""
import jax
import numpy as np

from varq_jax.models import zoo
from varq_jax.models.build import init_params
from varq_jax.quant import execution, rules, state
from varq_jax.quant.policy import QuantPolicy


def nbytes(tree) -> int:
    return int(sum(np.dtype(a.dtype).itemsize * np.prod(a.shape) for a in jax.tree.leaves(tree)))


def main():
    print("| model | weights | coded Linears (codes+scales+zp+sums) | their bf16 bytes | ratio | whole VAR | bf16 VAR | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in ("d16", "d30"):
        vae_cfg, var_cfg = zoo.preset(preset)
        params = jax.eval_shape(lambda k: init_params(vae_cfg, var_cfg, k), jax.random.PRNGKey(0))["var"]
        bf16_var = nbytes(params) // 2
        linear_bf16 = sum(2 * s.in_features * s.out_features for s in rules.model_sites(var_cfg)
                          if s.kind == rules.LINEAR)
        for w, a in ((8, 8), (4, 6), (4, 4)):
            policy = QuantPolicy(w_bits=w, a_bits=a)
            quant = jax.eval_shape(lambda v: state.init_quant_state(v, policy), params)
            p, q = jax.eval_shape(lambda v, s: execution.integer_model(v, s, policy), params, quant)
            b = execution.model_bytes(p, q)
            # the other params (embeddings, biases, the VAE aside) counted in bf16 like the bf16 model; θ as float32
            whole = b["coded_linears"] + nbytes(p) // 2 + (b["other"] - nbytes(p))
            print(f"| {preset} | W{w}A{a} | {b['coded_linears'] / 2**20:.1f} MiB | {linear_bf16 / 2**20:.1f} MiB | "
                  f"{b['coded_linears'] / linear_bf16:.3f} | {whole / 2**20:.1f} MiB | {bf16_var / 2**20:.1f} MiB | "
                  f"{whole / bf16_var:.3f} |", flush=True)


if __name__ == "__main__":
    main()
