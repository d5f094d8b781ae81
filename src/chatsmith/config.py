"""Config dataclasses are the single source of truth for every setting.

Each command has one dataclass; its fields *are* the command-line flags (``out`` -> ``--out``,
``max_steps`` -> ``--max-steps``) and the keys of ``--config file.yaml``. Precedence, lowest first:
field default < YAML file < explicit command-line flag.

    @dataclass
    class SFTConfig:
        model: str = arg("runs/base", "Model directory to fine-tune.")
        lr: float = arg(2e-5, "Peak learning rate.", min=0, min_exclusive=True)

    cfg = parse_config(SFTConfig, ["--lr", "1e-4"])
    parse_config(SFTConfig, ["--lr", "nan"])   # ChatsmithError: --lr: expected a finite number > 0, got nan

Every value is checked against its field's bounds (`arg(min=, max=, min_exclusive=, max_exclusive=)`; a
float must be finite), its choices, the machine's devices and the class's own `check_settings()` rules
by `validate_config`, which `config_from_dict` calls: flags, YAML files and the stages (Python callers)
all get the same checks, before any work starts.

Settings also answer to the names transformers and TRL users know (`HF_ALIASES`): `--learning-rate 1e-4` or
`learning_rate: 1e-4` in the YAML sets `lr`. The dataclass field keeps chatsmith's short name (it is what
train_config.yaml records); `--help` lists the alias next to the flag.

Tests: `python -m pytest tests/test_train_loop.py tests/test_validation.py -q`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from chatsmith.errors import ChatsmithError

T = typing.TypeVar("T")

SEED_MAX = 2**63 - 1          # the largest seed torch.manual_seed takes

# transformers' TrainingArguments / TRL name -> chatsmith field. An alias works wherever its field exists (an
# epochs alias only for the stages that have `epochs`), as a flag and as a YAML key.
HF_ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_grad_norm": "grad_clip",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "num_train_epochs": "epochs",
    "output_dir": "out",
    "gradient_checkpointing": "activation_checkpointing",
    "max_length": "max_len",
    "max_completion_length": "max_new_tokens",
    "num_ppo_epochs": "ppo_epochs",
}


def aliases_for(cls: type) -> dict[str, str]:
    """The `HF_ALIASES` that apply to ``cls``: its field exists and no field of ``cls`` has the alias's name."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {alias: field for alias, field in HF_ALIASES.items() if field in names and alias not in names}


def canonical_settings(cls: type, data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """``data`` with dashes turned into underscores and aliases into field names; a setting given under two
    names is an error."""
    aliases = aliases_for(cls)
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        name = aliases.get(name, name)
        if name in out:
            raise ChatsmithError(f"{source}: {given_as[name]!r} and {key!r} set the same setting ({name})")
        out[name], given_as[name] = value, key
    return out


def arg(default: Any = dataclasses.MISSING, help: str = "", *, choices: typing.Sequence[Any] | None = None,
        short: str | None = None, min: float | None = None, max: float | None = None,
        min_exclusive: bool = False, max_exclusive: bool = False, finite: bool = True) -> Any:
    """A dataclass field that documents itself as a CLI flag.

    ``min``/``max`` (inclusive unless ``min_exclusive``/``max_exclusive``) bound a numeric setting;
    ``finite`` (the default) refuses inf and nan in a float setting. `validate_config` checks them. A
    stage that overrides a field's default without restating its bounds keeps the parent's.
    """
    meta: dict[str, Any] = {"help": help, "choices": list(choices) if choices is not None else None, "short": short}
    if min is not None or max is not None:
        meta["range"] = Range(min, max, min_exclusive, max_exclusive)
    if not finite:
        meta["finite"] = False
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a numeric setting: ``min <= x <= max`` (strict where ``*_exclusive``)."""

    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False

    def contains(self, value: float) -> bool:
        if self.min is not None and (value <= self.min if self.min_exclusive else value < self.min):
            return False
        if self.max is not None and (value >= self.max if self.max_exclusive else value > self.max):
            return False
        return True

    def describe(self) -> str:
        """e.g. "> 0", ">= 1", "in [0, 1)"."""
        if self.min is not None and self.max is not None:
            return (f"in {'(' if self.min_exclusive else '['}{_num(self.min)}, {_num(self.max)}"
                    f"{')' if self.max_exclusive else ']'}")
        if self.min is not None:
            return f"{'>' if self.min_exclusive else '>='} {_num(self.min)}"
        return f"{'<' if self.max_exclusive else '<='} {_num(self.max)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce_value(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or string value to the field's declared type, with a clear error."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ChatsmithError(f"{where}: expected a value of type {getattr(base, '__name__', base)}, got null")
    origin = get_origin(base)
    try:
        if origin is Literal:
            allowed = get_args(base)
            if value not in allowed:
                raise ChatsmithError(f"{where}: expected one of {list(allowed)}, got {value!r}")
            return value
        if origin in (list, tuple):
            (inner,) = get_args(base)[:1] or (str,)
            items = value if isinstance(value, (list, tuple)) else [value]
            return [coerce_value(v, inner, where) for v in items]
        if origin is dict:
            if not isinstance(value, dict):
                raise ChatsmithError(f"{where}: expected a mapping, got {value!r}")
            return dict(value)
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ChatsmithError(f"{where}: expected true or false, got {value!r}")
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ChatsmithError(
            f"{where}: expected {getattr(base, '__name__', base)}, got {value!r}") from None
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a mapping; unknown keys and wrong types are errors that name the key."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in canonical_settings(cls, data, source).items():
        if name not in names:
            close = [n for n in names if n.split("_")[0] == name.split("_")[0]]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ChatsmithError(f"{source}: unknown setting {name!r} for {cls.__name__}{hint}")
        where = flag_name(name) if source == "command line" else f"{source}: field {name!r}"
        kwargs[name] = coerce_value(value, hints[name], where)
    try:
        cfg = cls(**kwargs)
    except TypeError as exc:
        raise ChatsmithError(f"{source}: {exc}") from None
    validate_config(cfg)
    return cfg


def field_metadata(cls: type, name: str) -> dict[str, Any]:
    """The metadata of field ``name``, with the bounds (``range``, ``finite``) a parent class declared when
    the class itself overrides only the default and help."""
    merged: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None:
            meta = dict(f.metadata or {})
            for key in ("range", "finite"):
                if key not in meta and key in merged:
                    meta[key] = merged[key]
            merged = meta
    return merged


def check_number(name: str, value: Any, meta: dict[str, Any]) -> None:
    """Refuse a numeric setting outside its declared bounds, naming the flag and the allowed range."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    bounds: Range | None = meta.get("range")
    is_float = isinstance(value, float)
    finite = meta.get("finite", True)
    kind = ("a finite number" if finite else "a number") if is_float else "an integer"
    expected = f"{kind} {bounds.describe()}" if bounds is not None else kind
    if is_float and (math.isnan(value) or (finite and math.isinf(value))):
        raise ChatsmithError(f"{flag_name(name)}: expected {expected}, got {value!r}")
    if bounds is not None and not bounds.contains(value):
        raise ChatsmithError(f"{flag_name(name)}: expected {expected}, got {value!r}")


def check_device(name: str, device: str) -> None:
    """Refuse a device this machine does not have (``--device cuda`` without CUDA), naming the flag."""
    from chatsmith.utils import check_device as check

    check(device, flag_name(name))


def validate_config(cfg: Any) -> None:
    """Check every setting of a config dataclass against its declared bounds, its device against the
    machine, then the class's own cross-setting rules (a ``check_settings()`` method); the first violation
    raises a `ChatsmithError` naming the flag and what is allowed. The CLI, `config_from_dict` (YAML) and
    the stages call it, so every caller gets the same checks before any work starts."""
    cls = type(cfg)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        meta = field_metadata(cls, f.name)
        if isinstance(value, (list, tuple)):
            for item in value:
                check_number(f.name, item, meta)
        else:
            check_number(f.name, value, meta)
        choices = meta.get("choices")
        if choices and value is not None and value not in choices:
            raise ChatsmithError(f"{flag_name(f.name)}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        if f.name.endswith("device") and isinstance(value, str):
            check_device(f.name, value)
    check = getattr(cfg, "check_settings", None)
    if callable(check):
        check()


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ChatsmithError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ChatsmithError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ChatsmithError(f"{path}: expected a mapping of setting: value at the top level")
    return data


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per dataclass field. Defaults are SUPPRESSed so we can tell what was given."""
    hints = _field_types(cls)
    aliases = aliases_for(cls)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="Read settings from a YAML file (keys are the flag names or their transformers "
                             "aliases); flags override it.")
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        meta = f.metadata or {}
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = meta.get("help", "")
        names = [flag_name(f.name)] + [flag_name(a) for a, target in aliases.items() if target == f.name]
        if meta.get("short"):
            names.insert(0, meta["short"])
        if tp is bool:
            help_text = f"{help_text} (default: {'on' if default else 'off'})"
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        origin = get_origin(tp)
        if origin is Literal:
            kwargs["choices"] = list(get_args(tp))
        elif meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if origin in (list, tuple):
            # "extend": a repeated flag adds to the list (`--override a --override b` keeps both) instead of
            # silently keeping only the last one.
            kwargs["nargs"] = "+"
            kwargs["action"] = "extend"
            kwargs["metavar"] = f.name.upper()
        else:
            kwargs["metavar"] = {int: "N", float: "X"}.get(tp, f.name.split("_")[-1].upper())
        if default is not None and default != [] and default != "":
            help_text = f"{help_text} (default: {default})"
        bounds = field_metadata(cls, f.name).get("range")
        if bounds is not None:
            help_text = f"{help_text} (allowed: {bounds.describe().removeprefix('in ')})"
        kwargs["help"] = help_text
        parser.add_argument(*names, **kwargs)


def parse_config(cls: type[T], argv: list[str] | None = None, prog: str | None = None,
                 description: str | None = None, parser: argparse.ArgumentParser | None = None) -> T:
    parser = parser or argparse.ArgumentParser(prog=prog, description=description,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, cls)
    ns = parser.parse_args(argv)
    return config_from_namespace(cls, ns)


def config_from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    values: dict[str, Any] = {}
    config_path = getattr(ns, "config", None)
    if config_path:
        values.update(canonical_settings(cls, load_yaml_config(config_path), source=config_path))
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in vars(ns).items():
        if name in names:
            values[name] = value
    return config_from_dict(cls, values, source=config_path or "command line")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    from chatsmith.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
