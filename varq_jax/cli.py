"""Shared command-line plumbing: config presets by name, checked overrides, quiet logs, one-line errors."""
import importlib.util
import os
import sys

import configs as _configs_pkg

CONFIG_DIR = os.path.abspath(list(_configs_pkg.__path__)[0])
_HELPERS = ("ptq",)

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
            raise SystemExit(f"error: config file {name!r} does not exist")
        return spec
    if name not in presets(prefix):
        raise SystemExit(f"error: unknown config preset {name!r}; valid presets: {', '.join(presets(prefix))} "
                         f"(or a path to a config file)")
    return os.path.join(CONFIG_DIR, name + ".py") + sep + arg


def load_config(spec: str):
    """The ConfigDict of a resolved spec 'path[:arg]' (errors in the preset argument become clean exits)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_varq_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _fields(cfg, prefix="") -> list:
    out = []
    for k, v in cfg.items():
        out += _fields(v, f"{prefix}{k}.") if hasattr(v, "items") else [f"{prefix}{k}"]
    return out


def rewrite_config_argv(argv: list, flag: str = "config", prefix: str = "") -> list:
    """Maps bare preset names in --config=NAME / --config NAME to their files and checks every
    --config.field=value override against the preset's fields, before absl parses argv."""
    out, spec, i = [], None, 0
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
    if overrides and spec is not None:
        valid = _fields(load_config(spec))
        unknown = [o for o in overrides if o not in valid]
        if unknown:
            raise SystemExit(f"error: unknown config field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}")
    return out


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
