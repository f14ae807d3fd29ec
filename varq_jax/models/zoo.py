"""Model zoo: the released VAR presets (per `build_vae_var`) and small presets for tests."""
import dataclasses

from varq_jax.models.var import VARConfig
from varq_jax.models.vqvae import VQVAEConfig

PATCH_NUMS = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
}


def released_var(depth: int, *, attn_l2_norm: bool = True) -> VARConfig:
    """VAR-d{depth}: width 64·depth, heads = depth; d36 is the 512-px shared-AdaLN model."""
    reso = 512 if depth == 36 else 256
    return VARConfig(depth=depth, width=64 * depth, heads=depth, num_classes=1000, vocab_size=4096, cvae=32,
                     patch_nums=PATCH_NUMS[reso], attn_l2_norm=attn_l2_norm, shared_aln=depth == 36)


def released_vae(reso: int = 256) -> VQVAEConfig:
    return VQVAEConfig(patch_nums=PATCH_NUMS[reso])


def tiny(patch_nums=(1, 2, 3, 4), *, shared_aln: bool = False, attn_l2_norm: bool = True, depth: int = 2,
         width: int = 128, heads: int = 2, vocab_size: int = 64, num_classes: int = 10):
    """A few-MB VQVAE + VAR pair for tests (the layout of the golden fixtures)."""
    vae = VQVAEConfig(vocab_size=vocab_size, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2, 2), patch_nums=patch_nums)
    var = VARConfig(depth=depth, width=width, heads=heads, num_classes=num_classes, vocab_size=vocab_size, cvae=8,
                    patch_nums=patch_nums, attn_l2_norm=attn_l2_norm, shared_aln=shared_aln)
    return vae, var


PRESETS = {
    "d16": lambda: (released_vae(256), released_var(16)),
    "d20": lambda: (released_vae(256), released_var(20)),
    "d24": lambda: (released_vae(256), released_var(24, attn_l2_norm=False)),
    "d30": lambda: (released_vae(256), released_var(30)),
    "d36": lambda: (released_vae(512), released_var(36)),
    "tiny": lambda: tiny(),
    "tiny-sharedaln": lambda: tiny((1, 2, 3, 5), shared_aln=True),
}


def preset(name: str):
    """(VQVAEConfig, VARConfig) of a named preset; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(cls, d: dict):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
