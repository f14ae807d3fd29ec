"""A resumable PTQ run: the pipeline (`varq_jax.quant.pipeline`) over a workdir of fingerprinted stages.

Before any work every stage already in the workdir is checked against what this run would make
(`pipeline.stage_fingerprints`): a stage made with other settings is refused naming the differing fields, or
with `restart=True` discarded with everything after it. A finished stage that fits is reused; an interrupted
reconstruction continues after its last finished unit. The calibration set can come from another run
(`calibration=`: its stage directory or workdir), verified on use, so the rows of a table share one set.
"""
import dataclasses
import os
from typing import Callable, Optional

from varq_jax import fingerprint
from varq_jax.checkpoint import ModelCheckpoint, read_state
from varq_jax.quant import pipeline
from varq_jax.quant.policy import QuantPolicy
from varq_jax.quant.settings import CalibSettings, PTQSettings
from varq_jax.runs.store import FORMAT, StageStore

CALIBRATION = "calibration"


def calibration_path(path: str) -> str:
    """The calibration stage directory of `path`: the stage itself, a PTQ state directory, or a quantize workdir."""
    for candidate in (path, os.path.join(path, CALIBRATION), os.path.join(path, "state", CALIBRATION)):
        if os.path.isdir(os.path.join(candidate, "ckpt")):
            return candidate
    raise ValueError(f"{path!r} holds no calibration set (expected a quantize workdir, its state/ directory, or "
                     f"state/calibration)")


def load_calibration(path: str, model_id: str) -> tuple:
    """(arrays, record) of a calibration set made by another run, its checksums verified and its model checked."""
    stage_dir = calibration_path(path)
    arrays, meta = read_state(stage_dir)
    if meta.get("format") != FORMAT or meta.get("stage") != CALIBRATION:
        raise ValueError(f"{stage_dir!r} is not a calibration set (stage {meta.get('stage')!r})")
    if meta["fingerprint"].get("model") != model_id:
        raise ValueError(f"the calibration set {stage_dir!r} was made from another model (model "
                         f"{meta['fingerprint'].get('model', '?')[:12]} there, {model_id[:12]} here)")
    return arrays, meta


def _calib_settings(record: dict) -> CalibSettings:
    fp = record["fingerprint"]
    fields = {f.name: fp[f"calib.{f.name}"] for f in dataclasses.fields(CalibSettings) if f"calib.{f.name}" in fp}
    return CalibSettings(**fields)


def run(ck: ModelCheckpoint, policy: QuantPolicy, settings: PTQSettings, workdir: str, *, restart: bool = False,
        calibration: Optional[str] = None, log: Callable = print, reconstruct: Optional[Callable] = None,
        report_config: Optional[dict] = None, progress=None) -> pipeline.PTQResult:
    """`pipeline.ptq` with its stages kept in `workdir` (see the module doc)."""
    if ck.policy is not None:
        raise ValueError("the model is already quantized; PTQ starts from a full-precision one")
    pipeline.validate(policy, settings, ck.var_cfg)
    model_id = fingerprint.model_digest(ck)
    shared = source = None
    if calibration is not None:
        source = calibration_path(calibration)
        shared = load_calibration(source, model_id)
        calib = _calib_settings(shared[1])
        if calib != settings.calib:
            changed = fingerprint.describe(fingerprint.fingerprint(calib=settings.calib),
                                           fingerprint.fingerprint(calib=calib))
            log(f"  calibration set from {source}: its settings replace the config's ({changed})")
        settings = dataclasses.replace(settings, calib=calib)      # its dtype as resolved when it was made
        pipeline.validate(policy, settings, ck.var_cfg)
    plan = pipeline.stage_fingerprints(ck.var_cfg, model_id, policy, settings)
    store = StageStore(workdir, log=log)
    store.reconcile(plan, restart=restart)
    if shared is not None:
        if fingerprint.differences(shared[1]["fingerprint"], plan[CALIBRATION]):
            raise ValueError(f"the calibration set {calibration!r} does not fit this run "
                             f"({fingerprint.describe(shared[1]['fingerprint'], plan[CALIBRATION])})")
        if store.record(CALIBRATION) is None:
            store.put(CALIBRATION, plan[CALIBRATION], shared[0], {"source": source})
    if report_config is not None and shared is not None:
        report_config = {**report_config, "calib": dataclasses.asdict(settings.calib), "calibration_from": source}
    result = pipeline.ptq(ck, policy, settings, log, reconstruct, report_config=report_config, progress=progress,
                          store=store, plan=plan)
    result.report["fingerprints"] = {stage: fingerprint.record_digest(fp) for stage, fp in plan.items()}
    return result


def run_config(ck: ModelCheckpoint, config, workdir: str, **kwargs) -> pipeline.PTQResult:
    """`run` on a PTQ config (configs/ptq.py): the config becomes (policy, settings) once, here."""
    policy, settings = pipeline.from_config(config, ck.var_cfg)
    report_config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return run(ck, policy, settings, workdir, report_config=report_config, **kwargs)
