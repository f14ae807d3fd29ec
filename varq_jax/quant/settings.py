"""Typed settings of a PTQ run: what the pipeline reads, made once from a config (or written directly in code).

`PTQSettings.from_config(config)` is the one place an ml_collections config becomes typed settings; the pipeline
and the public `varq_jax.quant.quantize` take these. The reconstruction schema is `ReconConfig`.
"""
import dataclasses

import numpy as np

from varq_jax.quant.reconstruction import ReconConfig

DTYPES = ("bfloat16", "float32")
PRECISIONS = ("highest", "default")
RECON_INPUTS = ("fp", "quant")


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class CalibSettings:
    """The calibration set: one FP sample per label (the official: 256 samples, CFG 1.5, top-k 900, top-p 0.96)."""
    num_samples: int = 256
    seed: int = 2025
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    batch_size: int = 32
    dtype: str = "auto"                   # of the calibration sampler: bfloat16 | float32 | auto (the run's dtype)

    def __post_init__(self):
        if self.dtype not in ("auto",) + DTYPES:
            raise ValueError(f"calib.dtype must be one of {('auto',) + DTYPES}, got {self.dtype!r}")
        _positive_int("calib.num_samples", self.num_samples)
        _positive_int("calib.batch_size", self.batch_size)


@dataclasses.dataclass(frozen=True)
class ThetaSettings:
    """The shift-and-sum θ search: BOP budget fraction α, grid size, calibration samples of the statistics pass."""
    alpha: float = 0.01
    n_grids: int = 10_000
    num_samples: int = 1

    def __post_init__(self):
        if not self.alpha > 0:
            raise ValueError(f"theta.alpha (BOP budget fraction) must be positive, got {self.alpha}")
        if isinstance(self.n_grids, bool) or not isinstance(self.n_grids, (int, np.integer)) or self.n_grids < 2:
            raise ValueError(f"theta.n_grids must be an int >= 2, got {self.n_grids!r}")
        _positive_int("theta.num_samples", self.num_samples)


@dataclasses.dataclass(frozen=True)
class PTQSettings:
    """Everything of a PTQ run except the rule table (the policy): stages on/off, their settings, numerics."""
    calib: CalibSettings = CalibSettings()
    theta: ThetaSettings = ThetaSettings()
    recon: ReconConfig = ReconConfig()
    reconstruction: bool = True
    resampling: bool = True
    dtype: str = "bfloat16"               # compute dtype of the sampling passes (calibration, θ statistics)
    matmul_precision: str = "highest"     # float32 matmuls: highest (true float32) | default (TF32 on GPU, bf16 on TPU)
    method: str = "custom"                # a label for reports

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.matmul_precision not in PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {PRECISIONS}, got {self.matmul_precision!r}")
        if self.theta.num_samples > self.calib.num_samples:
            raise ValueError(f"theta.num_samples ({self.theta.num_samples}) must be <= calib.num_samples "
                             f"({self.calib.num_samples})")

    @property
    def calib_dtype(self) -> str:
        return self.dtype if self.calib.dtype == "auto" else self.calib.dtype

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["recon"] = self.recon.to_dict()
        return d

    @classmethod
    def from_config(cls, config) -> "PTQSettings":
        """The typed settings of a PTQ config (configs/ptq.py); ValueError naming the field that is wrong."""
        r = config.recon
        if r.inputs not in RECON_INPUTS:
            raise ValueError(f"recon.inputs must be one of {RECON_INPUTS}, got {r.inputs!r}")
        try:
            recon = ReconConfig(iters=r.iters, batch_size=r.batch_size, lr=r.lr, weight=r.weight, p=r.p,
                                b_range=(r.b_start, r.b_end), warmup=r.warmup, quantized_inputs=r.inputs == "quant",
                                units=tuple(r.get("units", ())))
        except ValueError as e:
            raise ValueError(f"recon.{e}") from None
        return cls(calib=CalibSettings(**dict(config.calib)), theta=ThetaSettings(**dict(config.theta)), recon=recon,
                   reconstruction=bool(config.reconstruction), resampling=bool(config.resampling),
                   dtype=config.dtype, matmul_precision=config.get("matmul_precision", "highest"),
                   method=config.get("method", "custom"))
