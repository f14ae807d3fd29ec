"""Training of the embedded default model: VQVAE, then VAR on its tokens, and the metric classifier.

Each stage module has `train_and_export(config, workdir) -> export dir`; `loop` is the resumable loop,
`export` the shipped file format. `STAGES` lists them in the order they must run (VAR needs the VQVAE).
"""
from varq_jax.train import classifier, export, loop, optim, var, vqvae

STAGES = {"vqvae": vqvae, "var": var, "classifier": classifier}
