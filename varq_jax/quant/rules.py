"""Quantization as data: an ordered table of rules over full module paths, and the one lookup every stage asks.

A `Rule` is an fnmatch pattern over the *full* module path of a site (`blocks_3/ffn/fc2`, `head`, `blocks_3/attn`
for an attention) plus the settings it fixes; fields left `None` are not set by that rule. `resolve(rules, path)`
gives every setting of a site from the first rule that matches the path *and sets that setting* — so a user rule
`Rule("head", w_bits=8)` placed before a preset's rules changes the head's weight bits and inherits the rest.

Sites are the VAR's Linears (weights, their input activations) and its attention modules (the QKᵀ and A·V
operands, shift-and-sum V). Granularities:
  w_group   "auto" (official: groups of 128 input channels below 6 bits where they divide, else per output
            channel) | "channel" | N (groups of N input channels)
  a_group   "auto" (official: groups of 64 channels below 6 bits where the Linear's width is a multiple of 128,
            else per token) | "token" | N
  act_quantizer "auto" (official: the signed split for fc2, min-max elsewhere) | a registered name
            (`registry.ACT_QUANTIZERS`: per_token, per_group, signed_split, and the user's)
  weight_quantizer a registered name (`registry.WEIGHT_QUANTIZERS`: minmax, and the user's)
  rounding  "adaround" (learned by reconstruction where it runs) | "nearest" (never learned)
"""
import dataclasses
import fnmatch
import functools
from typing import Iterable, Optional, Sequence, Tuple, Union

from varq_jax.quant import quantizers

SETTINGS = ("w_bits", "w_group", "weight_quantizer", "rounding", "a_bits", "act_quantizer", "a_group",
            "weights", "acts", "attn", "shift_and_sum")
ROUNDINGS = ("nearest", "adaround")
LINEAR, ATTENTION = "linear", "attention"

Group = Union[None, str, int]


def _check_group(name: str, value: Group, word: str):
    if value is None or value in ("auto", word):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be 'auto', {word!r} or a positive int (group size), got {value!r}")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the table: a pattern over full module paths and the settings it fixes (None: not set here).

    `optional` marks a built-in rule that may match no module of a given model (e.g. `shared_ada_lin` exists only
    with shared AdaLN); a rule that is not optional and matches nothing is an error (`check_rules`)."""
    pattern: str
    w_bits: Optional[int] = None
    w_group: Group = None
    weight_quantizer: Optional[str] = None
    rounding: Optional[str] = None
    a_bits: Optional[int] = None
    act_quantizer: Optional[str] = None
    a_group: Group = None
    weights: Optional[bool] = None
    acts: Optional[bool] = None
    attn: Optional[bool] = None
    shift_and_sum: Optional[bool] = None
    optional: bool = False

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise ValueError(f"a rule's pattern must be a string, got {self.pattern!r}")
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if v is not None:
                try:
                    quantizers.check_bits(v)
                except ValueError as e:
                    raise ValueError(f"rule {self.pattern!r}: {name}: {e}") from None
        _check_group(f"rule {self.pattern!r}: w_group", self.w_group, "channel")
        _check_group(f"rule {self.pattern!r}: a_group", self.a_group, "token")
        if self.rounding is not None and self.rounding not in ROUNDINGS:
            raise ValueError(f"rule {self.pattern!r}: rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        for name in ("weights", "acts", "attn", "shift_and_sum"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"rule {self.pattern!r}: {name} must be a bool, got {v!r}")
        for name in ("weight_quantizer", "act_quantizer"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, str) and v):
                raise ValueError(f"rule {self.pattern!r}: {name} must be a quantizer name, got {v!r}")

    @classmethod
    def fp(cls, pattern: str, optional: bool = False) -> "Rule":
        """Full precision: weights, inputs and attention operands of the matched sites are not quantized."""
        return cls(pattern, weights=False, acts=False, attn=False, optional=optional)

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.pattern)

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in SETTINGS if getattr(self, k) is not None}

    def to_dict(self) -> dict:
        d = {"pattern": self.pattern, **self.settings()}
        if self.optional:
            d["optional"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        unknown = set(d) - set(SETTINGS) - {"pattern", "optional"}
        if unknown:
            raise ValueError(f"unknown rule fields {sorted(unknown)}; valid: pattern, {', '.join(SETTINGS)}, optional")
        if "pattern" not in d:
            raise ValueError(f"a rule needs a 'pattern', got {d!r}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class SiteRule:
    """Every setting of one site, resolved; `matched` lists the patterns that set something, in table order."""
    w_bits: int
    w_group: Group
    weight_quantizer: str
    rounding: str
    a_bits: int
    act_quantizer: str
    a_group: Group
    weights: bool
    acts: bool
    attn: bool
    shift_and_sum: bool
    matched: tuple = dataclasses.field(default=(), compare=False, hash=False)

    def weight_group(self, in_features: int) -> Optional[int]:
        """Input channels per weight group of a Linear with `in_features` inputs (None: per output channel)."""
        if self.w_group == "auto":
            return quantizers.weight_group_size(self.w_bits, in_features)
        if self.w_group == "channel":
            return None
        if in_features % self.w_group:
            raise ValueError(f"w_group {self.w_group} does not divide the {in_features} input channels "
                             f"(rule {self.first_match('w_group')!r})")
        return self.w_group

    def act_spec(self, site: str, in_features: int) -> Tuple[str, Optional[int]]:
        """(registered activation-quantizer name, channels per group or None) of a Linear's input."""
        name = self.act_quantizer
        if name == "auto":
            name = "signed_split" if site == "fc2" else "per_token"
        if self.a_group == "auto":
            group = quantizers.act_group_size(self.a_bits, in_features)
        elif self.a_group == "token":
            group = None
        else:
            group = self.a_group
            if in_features % group:
                raise ValueError(f"a_group {group} does not divide the {in_features} input channels "
                                 f"(rule {self.first_match('a_group')!r})")
        if name == "per_token" and group is not None:
            name = "per_group"
        if name == "per_group" and group is None:
            name = "per_token"
        return name, group

    def first_match(self, setting: str) -> str:
        return dict(self.matched).get(setting, "?")

    def as_rule(self, pattern: str) -> Rule:
        """This site's settings as one exact rule (a unit's policy is rebuilt from these; see QuantPolicy.bind)."""
        return Rule(pattern, **{k: getattr(self, k) for k in SETTINGS})

    def describe(self) -> dict:
        return {k: getattr(self, k) for k in SETTINGS}


@functools.lru_cache(maxsize=65536)
def resolve(rules: Tuple[Rule, ...], path: str) -> SiteRule:
    """The settings of the site at `path`: for each setting, the first matching rule that sets it."""
    found, matched = {}, []
    for rule in rules:
        if not rule.matches(path):
            continue
        for k, v in rule.settings().items():
            if k not in found:
                found[k] = v
                matched.append((k, rule.pattern))
    missing = [k for k in SETTINGS if k not in found]
    if missing:
        raise ValueError(f"no rule sets {', '.join(missing)} for module {path!r}")
    return SiteRule(**found, matched=tuple(matched))


def matched_patterns(site: SiteRule) -> list:
    """The distinct patterns that set something for a site, in table order."""
    out = []
    for _, pattern in site.matched:
        if pattern not in out:
            out.append(pattern)
    return out


def check_rules(rules: Sequence[Rule], paths: Iterable[str]) -> None:
    """ValueError naming every non-optional rule that matches none of the model's module paths (a typo)."""
    paths = list(paths)
    dead = [r.pattern for r in rules if not r.optional and not any(r.matches(p) for p in paths)]
    if dead:
        raise ValueError(f"quantization rule pattern(s) {', '.join(map(repr, dead))} match no module of this model "
                         f"(patterns are fnmatch over full paths such as 'blocks_3/ffn/fc2', 'blocks_3/*', 'head', "
                         f"'blocks_3/attn' for an attention)")


def shorthand_rules(w_bits: int, a_bits: int, *, weights: bool = True, acts: bool = True, attn: bool = True,
                    shift_and_sum: bool = True, fp_modules: Sequence[str] = ()) -> Tuple[Rule, ...]:
    """What `w_bits`, `a_bits` and `fp_modules` mean: one FP rule per pattern, then the official defaults for all."""
    return tuple(Rule.fp(p) for p in fp_modules) + (
        Rule("*", w_bits=w_bits, w_group="auto", weight_quantizer="minmax", rounding="adaround", a_bits=a_bits,
             act_quantizer="auto", a_group="auto", weights=weights, acts=acts, attn=attn,
             shift_and_sum=shift_and_sum, optional=True),)


def as_rule(value) -> Rule:
    """A Rule from a Rule, a dict (config files, JSON) or a (pattern, {settings}) pair."""
    if isinstance(value, Rule):
        return value
    if isinstance(value, dict) or hasattr(value, "to_dict"):
        return Rule.from_dict(dict(value.to_dict() if hasattr(value, "to_dict") else value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], str):
        return Rule.from_dict({"pattern": value[0], **dict(value[1])})
    raise ValueError(f"cannot read a quantization rule from {value!r}: give a Rule, a dict with 'pattern', "
                     f"or (pattern, settings)")


# --- the sites of a VAR ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Site:
    path: str
    kind: str               # linear | attention
    in_features: int = 0
    out_features: int = 0

    @property
    def name(self) -> str:
        """The Linear's site name as var.py gives it (fc2, mat_qkv, head, ...)."""
        return self.path.rsplit("/", 1)[-1]


def model_sites(var_cfg) -> list:
    """Every quantizable site of a VAR, in model order (Linears and attention modules)."""
    c = var_cfg.width
    sites = [Site("word_embed", LINEAR, var_cfg.cvae, c)]
    if var_cfg.shared_aln:
        sites.append(Site("shared_ada_lin", LINEAR, c, 6 * c))
    for i in range(var_cfg.depth):
        b = f"blocks_{i}"
        if not var_cfg.shared_aln:
            sites.append(Site(f"{b}/ada_lin", LINEAR, c, 6 * c))
        sites += [Site(f"{b}/attn/mat_qkv", LINEAR, c, 3 * c), Site(f"{b}/attn", ATTENTION),
                  Site(f"{b}/attn/proj", LINEAR, c, c), Site(f"{b}/ffn/fc1", LINEAR, c, var_cfg.hidden),
                  Site(f"{b}/ffn/fc2", LINEAR, var_cfg.hidden, c)]
    sites += [Site("head_nm", LINEAR, c, 2 * c), Site("head", LINEAR, c, var_cfg.vocab_size)]
    return sites


def join(*parts: str) -> str:
    return "/".join(p for p in parts if p)
