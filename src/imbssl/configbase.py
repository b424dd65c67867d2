"""The primitives of every config section, without torch: what config.py builds on and what each method module
defines its own section with (methods/*.py), so that a method's keys and their checks live beside the code that
reads them and config.py need not know them; and the YAML and ``--set`` helpers, which the CLI uses before it
imports torch (``--help`` and a mistyped override answer at once)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from imbssl.errors import ImbsslError


class ConfigError(ImbsslError, ValueError):
    """A configuration file or override that cannot be used as given."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def unused_keys(self) -> set[str]:
        """Fields whose values this section's other settings leave unread, so that a run folder saved under other
        defaults for them is still the same run."""
        return set()


class MethodSection(Section):
    """The ``method`` section of a run config: one subclass per method, each with ``name`` a Literal of its own name
    and only the keys its method reads (methods/__init__.py's ``MethodConfig`` is their union, keyed by name)."""

    name: str


class ProjectorSection(MethodSection):
    """A method whose projector g is an MLP: its hidden and output widths."""

    proj_hidden: int = Field(512, ge=1, description="the projector's hidden width")
    proj_dim: int = Field(512, ge=1, description="output dimension d (Table 1)")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, pair: str) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {pair}: {key!r} is not a section")
        node = child
    node[leaf] = value


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'line 3, column 7: mapping values are not allowed here', without PyYAML's '<unicode string>' excerpt."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["optim.epochs=5", "data.subset.profile=exp"]`` -> nested dict, values parsed as YAML."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair}: not of the form key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {pair}: the value is not valid YAML ({_yaml_problem(err)})") from None
        _set_dotted(tree, key.strip(), value, pair)
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str | Path, empty_ok: bool = True) -> dict[str, Any]:
    """A YAML mapping; ``empty_ok=False`` for files that imbssl wrote, where empty means truncated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({err})") from None
    if tree is None and not empty_ok:
        raise ConfigError(f"{path} is empty")
    tree = tree or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return tree
