"""Shared command-line plumbing: config presets by name, checked overrides, quiet logs, one-line errors."""
import ast
import importlib.util
import os
import sys
from typing import Any, Dict, List, Mapping, Sequence

import configs as _configs_pkg

CONFIG_DIR = os.path.abspath(list(_configs_pkg.__path__)[0])
_HELPERS = ("ptq", "eval", "sample")         # settings files, not PTQ presets

# Whole-loop CUDA graphs: XLA runs the scans (blocks of a scale, reconstruction iterations) as one graph with
# conditional nodes instead of syncing with the host every iteration (H100, batch 64: −18 ms for d16, −27 ms for
# d30 per batch). GPU-only options; other backends ignore them.
GPU_GRAPH_FLAGS = ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL "
                   "--xla_gpu_graph_min_graph_size=1")


def configure_xla() -> None:
    """Adds GPU_GRAPH_FLAGS to XLA_FLAGS; call before JAX starts a backend (the CLIs do, first thing). Kept off
    with VARQ_GPU_GRAPHS=0, or when XLA_FLAGS already sets xla_gpu_enable_command_buffer."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get("VARQ_GPU_GRAPHS", "1") == "0" or "xla_gpu_enable_command_buffer" in flags:
        return
    os.environ["XLA_FLAGS"] = f"{flags} {GPU_GRAPH_FLAGS}".strip()


def presets(prefix: str = "") -> list:
    """Config files by preset name; `prefix` filters (e.g. 'train_'), otherwise the PTQ presets."""
    names = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
    names = [n for n in names if n not in _HELPERS]
    return [n for n in names if n.startswith(prefix)] if prefix else [n for n in names if not n.startswith("train_")]


def resolve_config(spec: str, prefix: str = "") -> str:
    """'w4a6' → configs/w4a6.py, 'w4a6:brecq' → configs/w4a6.py:brecq; a path is kept. Unknown names list the
    valid presets."""
    name, sep, arg = spec.partition(":")
    if os.sep in name or name.endswith(".py"):
        if not os.path.isfile(name):
            raise ValueError(f"config file {name!r} does not exist")
        return spec
    if name not in presets(prefix):
        raise ValueError(f"unknown config preset {name!r}; valid presets: {', '.join(presets(prefix))} "
                         f"(or a path to a config file)")
    return os.path.join(CONFIG_DIR, name + ".py") + sep + arg


def load_config(spec: str):
    """The ConfigDict of a resolved spec 'path[:arg]' (a bad preset argument is a ValueError)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_varq_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _fields(cfg, prefix="") -> list:
    out = []
    for k, v in cfg.items():
        out += _fields(v, f"{prefix}{k}.") if hasattr(v, "items") else [f"{prefix}{k}"]
    return out


def rewrite_config_argv(argv: list, flag: str = "config", prefix: str = "", default: str = None) -> list:
    """Maps bare preset names in --config=NAME / --config NAME to their files and checks every
    --config.field=value override against the preset's fields, before absl parses argv; a bad name or field
    exits with one line `error: …`."""
    try:
        return _rewrite_config_argv(argv, flag, prefix, default)
    except ValueError as e:
        _exit(str(e))


def refuse_renamed(argv: list, names, flag: str = "config") -> None:
    """Old flat spellings of settings that moved into the config: one line naming the new spelling."""
    for a in argv[1:]:
        name = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        for n in names:
            if name in (n, "no" + n):
                _exit(f"--{n} is now --{flag}.{n} (settings go through --{flag}; see --help)")


def _exit(message: str):
    """A user error before absl runs: one line on stderr, exit code 2 (as `run`)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _rewrite_config_argv(argv: list, flag: str, prefix: str, default: str = None) -> list:
    out, spec, i = [], default, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(f"--{flag}="):
            spec = resolve_config(a.split("=", 1)[1], prefix)
            out.append(f"--{flag}={spec}")
        elif a == f"--{flag}" and i + 1 < len(argv):
            spec = resolve_config(argv[i + 1], prefix)
            out += [a, spec]
            i += 1
        else:
            out.append(a)
        i += 1
    overrides = [a[len(flag) + 3:].split("=", 1)[0] for a in out if a.startswith(f"--{flag}.")]
    if spec is not None:
        valid = _fields(load_config(spec))   # also refuses a bad config argument here, in one line
        unknown = [o for o in overrides if o not in valid]
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}")
    return out


# --- the ablation's runs, from preset and method names -------------------------------------------------------------
from configs import ptq as _ptq_configs  # noqa: E402

METHODS = tuple(_ptq_configs.METHODS)
# fields that name what a row is: set by the preset and method, never by an override
ROW_FIELDS = ("quantize", "w_bits", "a_bits", "method") + tuple(next(iter(_ptq_configs.METHODS.values())))


def quantized_presets() -> List[str]:
    return [p for p in presets() if p != "fp"]


def _parse_value(text: str, current):
    """A command-line string as the type of the field it overrides (bool, int, float, tuple, or str)."""
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, (tuple, list)):
        if text.strip()[:1] in "([":
            return tuple(ast.literal_eval(text))
        return tuple(x for x in text.split(",") if x)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides: Mapping[str, Any], preset: str = "the preset"):
    """config with `overrides` {dotted.field: value} set; strings are parsed as the field's type. Unknown fields
    and values of the wrong type are ValueErrors naming the field."""
    fixed = [f for f in overrides if f in ROW_FIELDS]
    if fixed:
        raise ValueError(f"config field(s) {', '.join(fixed)} are set by the preset and method of each row; "
                         f"choose them with the presets and methods lists instead")
    valid = _fields(config)
    unknown = [f for f in overrides if f not in valid]
    if unknown:
        raise ValueError(f"unknown config field(s) {', '.join(unknown)} for {preset}; valid fields: {', '.join(valid)}")
    config = config.copy_and_resolve_references()
    for field, value in overrides.items():
        *parents, leaf = field.split(".")
        node = config
        for p in parents:
            node = node[p]
        try:
            node[leaf] = _parse_value(value, node[leaf]) if isinstance(value, str) else value
        except (ValueError, TypeError, SyntaxError) as e:
            raise ValueError(f"bad value {value!r} for config field {field} (a {type(node[leaf]).__name__}): "
                             f"{e}") from None
    return config


def parse_override_args(args: Sequence[str], flag: str = "config") -> Dict[str, str]:
    """['--config.recon.iters=5', ...] → {'recon.iters': '5'}."""
    out = {}
    for a in args:
        if not a.startswith(f"--{flag}.") or "=" not in a:
            raise ValueError(f"overrides must look like --{flag}.field=value, got {a!r}")
        field, value = a[len(flag) + 3:].split("=", 1)
        out[field] = value
    return out


def ablation_plan(presets: Sequence[str], methods: Sequence[str], overrides: Mapping[str, Any] = ()):
    """The runs (`varq_jax.runs.ablation.Plan`), preset-major, with their configs; bad names or overrides are
    ValueErrors (nothing has run)."""
    from varq_jax.runs.ablation import Plan, Run
    presets, methods, overrides = list(presets), list(methods), dict(overrides)
    if not presets or not methods:
        raise ValueError("give at least one preset and one method")
    valid = quantized_presets()
    bad = [p for p in presets if p not in valid]
    if bad:
        extra = " ('fp' is always the first row)" if "fp" in bad else ""
        raise ValueError(f"unknown preset(s) {', '.join(bad)}{extra}; valid presets: {', '.join(valid)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}; valid methods: {', '.join(METHODS)}")
    for name, items in (("preset", presets), ("method", methods)):
        dup = sorted({x for x in items if items.count(x) > 1})
        if dup:
            raise ValueError(f"{name}(s) listed twice: {', '.join(dup)}")
    runs = []
    for p in presets:
        for m in methods:
            config = load_config(resolve_config(f"{p}:{m}"))
            config = apply_overrides(config, overrides, f"{p}:{m}")
            if not config.quantize:
                raise ValueError(f"preset {p} does not quantize; list quantized presets only")
            runs.append(Run(p, m, config))
    return Plan(runs, presets, methods, overrides)


def quiet_logs() -> None:
    """Hide absl/orbax INFO chatter in the CLIs (warnings and errors still show)."""
    from absl import logging
    logging.set_verbosity(logging.WARNING)


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def run(main) -> None:
    """`absl.app.run(main)` with the CLIs' convention: a user error (bad input, a missing or corrupt file) is one
    line `error: …` on stderr and exit code 2, no traceback; stray positional arguments are refused."""
    from absl import app

    def wrapped(argv):
        if len(argv) > 1:
            print(f"error: unexpected arguments {' '.join(argv[1:])!r} (flags are --name=value)", file=sys.stderr)
            sys.exit(2)
        try:
            return main(argv)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    app.run(wrapped)
