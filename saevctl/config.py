"""Configuration plumbing shared by every stage: typed Config fields, their docstrings, TOML files, devices.

A stage declares each setting once, as a field of its frozen `Config` (a `ConfigBase`) with a docstring; the CLI
(`saevctl.cliconfig`), TOML files and Python callers all fill it through the same coercion and checks here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, ClassVar, Literal, TypeVar

from saevctl.errors import InputError

C = TypeVar("C")
Kind = Literal["path", "int", "float", "str", "bool"]
Compute = Literal["float32", "bfloat16"]
"""An encoder's precisions (mine --compute); features label and eval's baselines encode as the index records."""


@dataclass(frozen=True)
class CliMeta:
    """How a field appears on the command line, beyond what its name, type, default and docstring say."""

    short: str | None = None
    """A one-letter alias such as "-s"."""
    flag: str | None = None
    """Option name(s) replacing the default `--field-name`, e.g. "--drop-cache/--keep-cache" or "--clamp"."""
    default_text: str | None = None
    """How the default reads in --help (else the default value itself, or nothing for None)."""
    hidden: bool = False
    """Not offered on the command line (a Python-only or TOML-only setting)."""
    argument: bool = False
    """A positional argument (`saevctl sae import SRC`) rather than an option; required unless it has a default."""
    repeat: bool = False
    """A list option that may also be repeated (`--sae a --sae b`); otherwise a repeated option keeps its last
    value, as options always have."""
    example: str | None = None
    """What a required field's error suggests when it is left out ("--images DIR"; else the bare flag)."""


def opt(default: Any = dataclasses.MISSING, *, short: str | None = None, flag: str | None = None,
        default_text: str | None = None, hidden: bool = False, argument: bool = False, repeat: bool = False,
        example: str | None = None, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its command-line spelling (`x: int = opt(3, short="-x")`)."""
    meta = {"cli": CliMeta(short, flag, default_text, hidden, argument, repeat, example)}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class FieldSpec:
    """One Config field as the CLI and the coercion see it."""

    name: str
    kind: Kind
    many: bool
    """A tuple of `kind` (a comma list on the command line, a list in TOML)."""
    optional: bool
    choices: tuple[str, ...]
    required: bool
    default: Any
    doc: str
    cli: CliMeta

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_KINDS: dict[Any, Kind] = {Path: "path", int: "int", float: "float", str: "str", bool: "bool"}


def _classify(hint: Any) -> tuple[Kind, bool, bool, tuple[str, ...]]:
    """(kind, many, optional, choices) of a field's type hint."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        assert len(args) == 1, f"unsupported union {hint}"
        hint = args[0]
        origin = typing.get_origin(hint)
    many = origin is tuple
    if many:
        item_args = typing.get_args(hint)
        assert len(item_args) == 2 and item_args[1] is Ellipsis, f"only tuple[X, ...] is supported, not {hint}"
        hint = item_args[0]
    if typing.get_origin(hint) is Literal:
        return "str", many, optional, tuple(str(a) for a in typing.get_args(hint))
    assert hint in _KINDS, f"unsupported Config field type {hint}"
    return _KINDS[hint], many, optional, ()


_CLASS_RE = re.compile(r"^class (\w+)\b", re.M)
# A field line at class level (continuation lines indented deeper), then its docstring on the next line.
_FIELD_DOC_RE = re.compile(r'^    (\w+): [^\n]*(?:\n {8,}[^\n]*)*\n    """(.*?)"""', re.M | re.S)


@functools.cache
def _module_docs(fpath: str) -> dict[str, dict[str, str]]:
    """Attribute docstrings of every top-level class in one source file: {class: {field: one-line doc}}.

    A regular expression rather than `ast`, because every command's --help pays for this at start-up (ast costs
    ~5 ms a module); tests/test_cliconfig.py checks it against `ast` for every Config."""
    with open(fpath, encoding="utf-8") as f:
        text = f.read()
    out: dict[str, dict[str, str]] = {}
    starts = list(_CLASS_RE.finditer(text))
    for m, nxt in zip(starts, [*starts[1:], None], strict=True):
        body = text[m.end() : nxt.start() if nxt else len(text)]
        out[m.group(1)] = {f.group(1): " ".join(f.group(2).split()) for f in _FIELD_DOC_RE.finditer(body)}
    return out


def field_docs_ast(cls: type) -> dict[str, str]:
    """The same as `field_docs`, read with `ast` (slow; the reference the tests compare against)."""
    import ast
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        node = tree.body[0]
        assert isinstance(node, ast.ClassDef)
        for prev, cur in itertools.pairwise(node.body):
            if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(cur, ast.Expr)
                    and isinstance(cur.value, ast.Constant) and isinstance(cur.value.value, str)):
                docs[prev.target.id] = " ".join(cur.value.value.split())
    return docs


_DOCS: dict[type[Any], dict[str, str]] = {}
_SPECS: dict[type[Any], tuple[FieldSpec, ...]] = {}


def field_docs(cls: type[Any]) -> dict[str, str]:
    """Attribute docstrings (the string literal right under a field) of a dataclass and its bases, one line each."""
    if cls not in _DOCS:
        _DOCS[cls] = _field_docs(cls)
    return _DOCS[cls]


def _field_docs(cls: type[Any]) -> dict[str, str]:
    """Attribute docstrings (the string literal right under a field) of a dataclass and its bases, one line each."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        fpath = inspect.getsourcefile(klass)
        assert fpath is not None, klass
        docs.update(_module_docs(fpath).get(klass.__name__, {}))
    return docs


def field_specs(cls: type[Any]) -> tuple[FieldSpec, ...]:
    """Every field of a Config dataclass, typed and documented: the class's own fields first, then those of its
    bases, nearest base first (so --help reads from the specific to the shared)."""
    if cls not in _SPECS:
        _SPECS[cls] = _field_specs(cls)
    return _SPECS[cls]


def _field_specs(cls: type[Any]) -> tuple[FieldSpec, ...]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    owner = {f.name: next(i for i, k in enumerate(cls.__mro__) if f.name in inspect.get_annotations(k))
             for f in dataclasses.fields(cls)}
    for f in sorted(dataclasses.fields(cls), key=lambda f: owner[f.name]):
        if f.name.startswith("_"):
            continue
        kind, many, optional, choices = _classify(hints[f.name])
        default: Any = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        required = default is dataclasses.MISSING
        meta = f.metadata.get("cli", CliMeta())
        out.append(FieldSpec(f.name, kind, many, optional, choices, required, None if required else default,
                             docs.get(f.name, ""), meta))
    return tuple(out)


def _one(spec: FieldSpec, value: Any, where: str) -> Any:
    """One scalar converted to the field's kind; a wrong value is one InputError naming the option."""
    try:
        if spec.kind == "path":
            return Path(value).expanduser() if isinstance(value, (str, Path)) else _bad(value)
        if spec.kind == "bool":
            return value if isinstance(value, bool) else _bad(value)
        if spec.kind == "int":
            if isinstance(value, bool):
                return _bad(value)
            if isinstance(value, float) and not value.is_integer():
                return _bad(value)
            return int(value)
        if spec.kind == "float":
            if isinstance(value, bool):
                return _bad(value)
            return float(value)
        if isinstance(value, PurePath):  # a str field naming "a path or an id" takes a Path from Python callers
            return str(value)
        return value if isinstance(value, str) else _bad(value)
    except (TypeError, ValueError, OverflowError) as e:
        example = {"int": "an integer", "float": "a number", "path": "a path", "bool": "true or false"}.get(
            spec.kind, "text")
        if spec.many:
            plural = {"int": "integers", "float": "numbers", "path": "paths"}.get(spec.kind, "values")
            example += f", or comma-separated {plural}"
        raise InputError(f"bad {where} {value!r}", f"{where} takes {example}") from e


def _bad(value: Any) -> Any:
    raise TypeError(value)


def coerce_value(spec: FieldSpec, value: Any, where: str | None = None) -> Any:
    """A raw value (CLI text, TOML value, Python argument) in the field's type: comma lists become tuples."""
    where = where or (spec.cli.flag.split("/")[0] if spec.cli.flag else spec.flag)
    if value is None:
        if spec.optional:
            return None
        raise InputError(f"{where} needs a value", f"pass {where}")
    if spec.many:
        if isinstance(value, str):
            items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        return tuple(_one(spec, v, where) for v in items)
    if isinstance(value, str) and spec.kind in ("int", "float"):
        value = value.strip()
    return _one(spec, value, where)


def check_choices(spec: FieldSpec, value: Any) -> None:
    """A Literal-typed field holds one of its choices (each item, for a tuple)."""
    if not spec.choices or value is None:
        return
    for v in value if spec.many else (value,):
        if v not in spec.choices:
            where = spec.cli.flag.split("/")[0] if spec.cli.flag else spec.flag
            raise InputError(f"unknown {where} {v!r}", f"use {', '.join(spec.choices)}")


class ConfigBase:
    """Base of every stage Config (a frozen dataclass): fields are coerced to their declared types and Literal
    fields checked on construction, whether the values came from Python, a TOML file or the command line.
    Subclasses add their own range checks in `check()`."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def __post_init__(self) -> None:
        for spec in field_specs(type(self)):
            value = getattr(self, spec.name)
            if value is not None or not spec.optional:
                value = coerce_value(spec, value)
            check_choices(spec, value)
            object.__setattr__(self, spec.name, value)
        self.check()

    def check(self) -> None:
        """Range and consistency checks of this Config (one InputError line each)."""


def check_finite(name: str, value: float | None, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    """A numeric option is finite and in range (`low_open`: strictly above `low`); else one line naming it."""
    if value is None:
        return
    where = "--" + name.replace("_", "-")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where} {value} is not a finite number", f"pass a finite {where}")
    if low == 1 and not low_open and isinstance(value, int) and value < 1:  # counts and sizes: one wording
        raise InputError(f"{where} {value} is out of range: it must be positive", f"pass {where} 1 or more")
    if low is not None and (value <= low if low_open else value < low):
        raise InputError(f"{where} {_num(value)} is out of range",
                         f"{where} must be {'>' if low_open else '>='} {_num(low)}")
    if high is not None and value > high:
        raise InputError(f"{where} {_num(value)} is out of range", f"{where} must be <= {_num(high)}")


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"  # --top-k 1000000000, not 1e+09


MAX_SEED = 2**63 - 1
"""Largest --seed: torch's generators take 64 bits, numpy's refuse negative seeds."""


def load_toml(fpath: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(fpath).read_text())
    except FileNotFoundError as e:
        raise InputError(f"config file {fpath} does not exist", "check the --config path") from e
    except IsADirectoryError as e:
        raise InputError(f"config file {fpath} is a folder", "pass a TOML file to --config") from e
    except UnicodeDecodeError as e:
        raise InputError(f"config file {fpath} is not text", "pass a TOML file to --config") from e
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"config file {fpath} is not valid TOML ({e})", "fix the file's syntax") from e


def merge_config(cls: type[C], file_values: Mapping[str, Any], cli_values: Mapping[str, Any]) -> C:
    """Build `cls` from TOML values overridden by explicitly given CLI values (None means not given)."""
    names = {spec.name for spec in field_specs(cls)}
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise InputError(f"unknown config keys {unknown}", f"valid keys: {', '.join(sorted(names))}")
    values = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    for spec in field_specs(cls):
        if spec.required and values.get(spec.name) is None:
            where = spec.cli.flag.split("/")[0] if spec.cli.flag else spec.flag
            raise InputError(f"missing {where}", f"pass {spec.cli.example}" if spec.cli.example
                             else f"pass {where} (or set {spec.name} in the --config file)")
    return cls(**values)


def resolve_device(device: str) -> str:
    """auto -> cuda when available, else cpu; cuda without CUDA is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}", "use auto, cpu or cuda")
    return device


# --- settings several stages share: declared once here, mixed into each stage's Config ----------------------


@dataclass(frozen=True, kw_only=True)
class DeviceOpts(ConfigBase):
    device: str = "auto"
    """auto, cpu or cuda."""


@dataclass(frozen=True, kw_only=True)
class RerunOpts(ConfigBase):
    force: bool = False
    """Redo the work even when its inputs (checkpoint, store, images, index, options) are unchanged since the
    last run, which otherwise says so and keeps its output."""


@dataclass(frozen=True, kw_only=True)
class StatsOpts(ConfigBase):
    n_boot: int = 1000
    """Bootstrap resamples behind every confidence interval."""
    seed: int = 0
    """Seed for the random controls and the bootstrap."""

    def check(self) -> None:
        super().check()
        if self.n_boot < 1:
            raise InputError(f"--n-boot {self.n_boot} draws no resamples", "pass --n-boot 1 or more (1000 is usual)")
        check_finite("seed", self.seed, low=0, high=MAX_SEED)


@dataclass(frozen=True, kw_only=True)
class VerdictOpts(ConfigBase):
    min_effect: float = 0.05
    """Smallest mean effect a verdict calls specific (a share: of predictions flipped, of pixels or patches whose
    class changed); an edit whose CI clears both controls' but whose mean is smaller is 'too small'."""

    def check(self) -> None:
        super().check()
        check_finite("min_effect", self.min_effect, low=0, high=1)


@dataclass(frozen=True, kw_only=True)
class SaeRef(ConfigBase):
    """An SAE checkpoint and the mined index that holds it (for commands that need no task head, e.g. eval recon)."""

    sae: Path | None = opt(None, short="-s")
    """SAE checkpoint folder (default: the workspace's SAE)."""
    index: Path | None = None
    """Mined index holding the SAE (default: the workspace's): its statistics give Nx clamps and matched controls,
    and outputs go beside it so saevctl report links them."""


@dataclass(frozen=True, kw_only=True)
class SaeTarget(SaeRef, DeviceOpts):
    """The SAE under test, the mined index that holds its statistics, and the task head it is tested on."""

    head: str | None = None
    """saliency (demo model), timm (the model's own classifier), clip (with --classes), or a trained head folder
    (default: saliency on the demo model, else timm)."""
    classes: str | None = None
    """Prompts for --head clip, comma-separated: "a photo of a cat,a photo of a dog"."""


@dataclass(frozen=True, kw_only=True)
class IndexOpt(ConfigBase):
    """A mined index, for the commands that read it whole (saevctl sql)."""

    index: Path | None = None
    """DuckDB index to read (default: the one last mined in this workspace, recorded in ./saevctl.toml, else in
    $SAEVCTL_HOME/last.toml)."""


@dataclass(frozen=True, kw_only=True)
class IndexQuery(IndexOpt):
    """A mined index and one SAE in it, for the commands that read the index."""

    sae: str | None = None
    """SAE in the index: a checkpoint path or an SAE id (default: the workspace's last mined SAE when it is in the
    index, else the index's last mined SAE)."""

