"""A generic resumable training loop: jitted step, Orbax CheckpointManager, progress with rate and ETA.

A stage supplies `init_state()` and a jitted `train_step(state) -> (state, metrics)` that draws its batch from
`state.step` alone (see `varq_jax.data.shapes.batch_indices`) and its randomness from `fold_in(key, step)`.
A restarted run therefore restores the last checkpoint and continues with exactly the data and random numbers
it would have seen without the interruption.
"""
import json
import os
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; extra: stage state outside the gradient (e.g. codebook usage), {} if none."""
    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Logs averaged metrics, steps/s, items/s and ETA every `every` steps (rate measured after compilation)."""

    def __init__(self, name: str, total: int, items_per_step: int, every: int, log_path: Optional[str]):
        self.name, self.total, self.items_per_step, self.every = name, total, items_per_step, every
        self.log_path = log_path
        self._sums, self._count = None, 0
        self._t0 = self._step0 = None
        self._created = time.perf_counter()

    def update(self, step: int, metrics: dict):
        """`step` is the number of completed steps; metrics are device scalars (fetched only when logging)."""
        self._sums = metrics if self._sums is None else jax.tree.map(jnp.add, self._sums, metrics)
        self._count += 1
        if self._t0 is None:                          # first step done: compilation is behind us
            jax.block_until_ready(metrics)
            self._t0, self._step0 = time.perf_counter(), step
            logging.info("[%s] first step (with compilation) took %.1f s", self.name, self._t0 - self._created)
            return
        if step % self.every and step != self.total:
            return
        means = {k: float(v) / self._count for k, v in jax.device_get(self._sums).items()}
        elapsed = time.perf_counter() - self._t0
        rate = (step - self._step0) / elapsed if elapsed > 0 else float("nan")
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        text = " ".join(f"{k}={v:.4g}" for k, v in sorted(means.items()))
        logging.info("[%s] step %d/%d  %s  | %.2f steps/s %.0f items/s  ETA %s", self.name, step, self.total,
                     text, rate, rate * self.items_per_step, _format_seconds(eta) if np.isfinite(eta) else "?")
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"step": step, "steps_per_s": rate, **means}) + "\n")
        self._sums, self._count = None, 0


def checkpoint_manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def compiler_options(config) -> Optional[dict]:
    """The config's XLA `compiler_options`, if any (the toy config turns the backend optimiser off: CPU tests
    then compile in a fraction of the time)."""
    options = config.get("compiler_options", None)
    options = options.to_dict() if hasattr(options, "to_dict") else options
    return dict(options) if options else None


def jit(fn, config):
    return jax.jit(fn, compiler_options=compiler_options(config))


def restore_or_init(manager: ocp.CheckpointManager, init_state: Callable[[], TrainState],
                    compiler_options: Optional[dict] = None) -> TrainState:
    """The latest checkpoint if there is one, else a fresh state (initialised as one compiled program)."""
    step = manager.latest_step()
    if step is None:
        return jax.jit(init_state, compiler_options=compiler_options or None)()
    abstract = jax.eval_shape(init_state)
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    if int(state.step) != step:
        raise ValueError(f"checkpoint {step} in {manager.directory} holds step {int(state.step)}")
    logging.info("restored checkpoint at step %d from %s", step, manager.directory)
    return state


def run(*, name: str, ckpt_dir: str, init_state: Callable[[], TrainState],
        train_step: Callable[[TrainState], tuple], num_steps: int, items_per_step: int, log_every: int = 100,
        ckpt_every: int = 1000, stop_at: Optional[int] = None, log_path: Optional[str] = None,
        compiler_options: Optional[dict] = None) -> TrainState:
    """Trains from the latest checkpoint in `ckpt_dir` (or from scratch) up to `num_steps` steps.

    `stop_at` ends this invocation early at that step (checkpointed), as a preemption would; a later call
    continues from there. Returns the final state (checkpointed).
    """
    if num_steps < 0 or log_every <= 0 or ckpt_every <= 0:
        raise ValueError(f"need num_steps ≥ 0 and positive log_every/ckpt_every, got {num_steps}, "
                         f"{log_every}, {ckpt_every}")
    end = num_steps if stop_at is None or stop_at < 0 else min(stop_at, num_steps)
    manager = checkpoint_manager(ckpt_dir)
    state = restore_or_init(manager, init_state, compiler_options)
    start = int(state.step)
    if start > num_steps:
        raise ValueError(f"checkpoint in {ckpt_dir} is at step {start}, past num_steps={num_steps}")
    logging.info("[%s] steps %d → %d of %d", name, start, end, num_steps)
    progress = Progress(name, num_steps, items_per_step, log_every, log_path)
    for step in range(start, end):
        state, metrics = train_step(state)
        progress.update(step + 1, metrics)
        if (step + 1) % ckpt_every == 0 and step + 1 != end:
            manager.save(step + 1, args=ocp.args.StandardSave(state))
    if manager.latest_step() != end:
        manager.save(end, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
    manager.close()
    return state


def run_stage(config, workdir: str, name: str, section, init_state: Callable[[], TrainState],
              train_step: Callable[[TrainState], tuple]) -> Optional[TrainState]:
    """`run` for a stage `name` of a training config (section = config.<name>): checkpoints in
    workdir/name/ckpt, metrics in workdir/name/metrics.jsonl. None if stopped early by config.stop_at_step."""
    stage_dir = os.path.join(workdir, name)
    state = run(name=name, ckpt_dir=os.path.join(stage_dir, "ckpt"), init_state=init_state, train_step=train_step,
                num_steps=section.num_steps, items_per_step=section.batch_size, log_every=section.log_every,
                ckpt_every=section.ckpt_every, stop_at=config.stop_at_step,
                log_path=os.path.join(stage_dir, "metrics.jsonl"), compiler_options=compiler_options(config))
    return state if int(state.step) >= section.num_steps else None
