"""Per-workspace defaults: the store, SAE and index last used here, kept in `./saevctl.toml`.

`saevctl features top --id 6909` needs no flags because `mine` records what it made; a copy under
SAEVCTL_HOME is the fallback when the working directory has no file (or no such key).
"""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path

from saevctl import atomic, layout
from saevctl.errors import CheckpointError

log = logging.getLogger(__name__)

KEYS = ("store", "sae", "index")
SECTION = "defaults"


def home_fpath() -> Path:
    """The last-used defaults across workspaces (fallback when ./saevctl.toml lacks a key)."""
    return layout.home_dpath() / "last.toml"


def _read(fpath: Path) -> dict[str, str]:
    try:
        data = tomllib.loads(fpath.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        # A hand-edited, broken defaults file must not stop every command; say so and ignore it.
        log.warning("ignoring unreadable workspace defaults %s (%s)", fpath, e)
        return {}
    section = data.get(SECTION, {})
    return {k: str(v) for k, v in section.items() if isinstance(v, str)} if isinstance(section, dict) else {}


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped) + '"'


def _render(values: dict[str, str], extra: dict[str, object]) -> str:
    lines = ["# saevctl workspace defaults, written by saevctl mine; edit freely.", f"[{SECTION}]"]
    lines += [f"{k} = {_toml_string(v)}" for k, v in values.items()]
    text = "\n".join(lines) + "\n"
    # Keep any other tables a user or another stage added to the file.
    for name, table in extra.items():
        if isinstance(table, dict):
            body = [f"{k} = {_toml_string(str(v))}" for k, v in table.items() if isinstance(v, (str, int, float))]
            text += f"\n[{name}]\n" + "\n".join(body) + "\n"
    return text


def get_default(key: str, cwd: Path | None = None) -> str | None:
    """The workspace's default for `key` (store, sae or index): ./saevctl.toml first, then SAEVCTL_HOME."""
    assert key in KEYS, key
    value = _read(layout.workspace_fpath(cwd)).get(key)
    return value if value is not None else _read(home_fpath()).get(key)


def set_defaults(cwd: Path | None = None, **values: str | Path | None) -> Path:
    """Record defaults (None values are left as they were) in ./saevctl.toml and SAEVCTL_HOME; atomic."""
    bad = sorted(set(values) - set(KEYS))
    assert not bad, f"unknown workspace keys {bad}"
    new = {k: str(v) for k, v in values.items() if v is not None}
    fpath = layout.workspace_fpath(cwd)
    for target in (fpath, home_fpath()):
        try:
            extra = tomllib.loads(target.read_text()) if target.is_file() else {}
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            extra = {}
        merged = {**_read(target), **new}
        ordered = {k: merged[k] for k in KEYS if k in merged}
        extra.pop(SECTION, None)
        atomic.write_text(target, _render(ordered, extra))
    return fpath


def index_or_default(index: Path | None) -> Path:
    """The given index, else the one last mined in this workspace; a clear error when there is none."""
    from saevctl.errors import IndexError_

    if index is not None:
        return Path(index)
    value = get_default("index")
    if not value:
        raise IndexError_("no --index given and none mined in this workspace",
                          "run saevctl mine --sae CKPT --store DIR, or pass --index")
    return Path(value)


def resolve_sae_ref(sae: Path | str | None) -> Path:
    """The SAE a command names: `sae` (~ expanded), else this workspace's default SAE; a clear error when neither.

    The path is kept as given (a `train --out` folder stays that folder); `resolve_ckpt` finds the checkpoint in it.
    """
    if sae is not None:
        return Path(sae).expanduser()
    default = get_default("sae")
    if default is None:
        raise CheckpointError("no --sae given and this workspace has no default SAE", "pass --sae path/to/checkpoint")
    return Path(default)


def resolve_ckpt(dpath: Path) -> Path:
    """A checkpoint folder from itself, one of its files, or a one-SAE `saevctl train --out` folder."""
    if dpath.is_file():
        return dpath.parent
    sweep = layout.train_sweep_fpath(dpath)
    if not layout.sae_config_fpath(dpath).is_file() and sweep.is_file():
        try:
            runs = json.loads(sweep.read_text()).get("runs", [])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{sweep} is corrupt", "re-run saevctl train --resume to rewrite it") from e
        if len(runs) == 1:
            return layout.train_run_dpath(dpath, runs[0]["name"])
        names = ", ".join(r["name"] for r in runs[:3])
        more = ", ..." if len(runs) > 3 else ""
        raise CheckpointError(f"{dpath} holds {len(runs)} SAEs from a sweep",
                              f"pass one of its folders, e.g. {dpath / runs[0]['name']} (runs: {names}{more})")
    return dpath
