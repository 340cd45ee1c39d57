"""Shared configuration plumbing: TOML files into stage Configs, device resolution, comma lists.

Each stage defines its own frozen `Config`; this module only fills one from a file and checks names.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from saevctl.errors import InputError

C = TypeVar("C")


def load_toml(fpath: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(fpath).read_text())
    except FileNotFoundError as e:
        raise InputError(f"config file {fpath} does not exist", "check the --config path") from e
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"config file {fpath} is not valid TOML ({e})", "fix the file's syntax") from e


def coerce_paths(cfg: Any, *names: str) -> None:
    """Turn the named fields of a frozen Config into expanded Paths (a TOML file gives them as strings)."""
    for name in names:
        if getattr(cfg, name) is not None:
            object.__setattr__(cfg, name, Path(getattr(cfg, name)).expanduser())


def merge_config(cls: type[C], file_values: dict[str, Any], cli_values: dict[str, Any]) -> C:
    """Build `cls` from TOML values overridden by explicitly given CLI values (None means not given)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise InputError(f"unknown config keys {unknown}", f"valid keys: {', '.join(sorted(names))}")
    values = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
    return cls(**values)


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise InputError(f"bad {what} {text!r}", f"write {what} as comma-separated integers, e.g. 6,11") from e


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
