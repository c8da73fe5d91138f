"""Building blocks of the job file's schema, shared by config.py, the methods and the defences.

Kept apart from config.py so that a method or a defence can declare its own config class (beside its
code, in its own file) without importing the job config that collects them.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict

DataFormat = Literal["alpaca", "chat", "text", "tokenized"]

# Path markers, read by distrib_ft.job.resolve: an ``InputPath`` must exist and becomes absolute (relative
# paths resolve against the job file, then the working directory, then the project); an ``OutputPath``
# becomes absolute against the working directory; a ``StorePath`` resolves like an input when it exists,
# like an output otherwise. URLs (``scheme://...``) are left as they are.


@dataclass(frozen=True)
class PathKind:
    """Marks a config field as a path: ``input``, ``output`` or ``store``.

    ``input`` (must exist), ``output`` (relative to the working directory; may not exist yet) or ``store`` (a
    folder that may exist already, e.g. a replay buffer, or a URL).
    """

    kind: Literal["input", "output", "store"]


InputPath = Annotated[str, PathKind("input")]
OutputPath = Annotated[str, PathKind("output")]
StorePath = Annotated[str, PathKind("store")]


class Strict(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A job config that cannot run; the message is one line naming the file and the key."""


class DuplicateKeyError(ValueError):
    """A mapping that names the same key twice (YAML or JSON); the message names the key and both places."""


def load_yaml_unique(text: str):
    """``yaml.safe_load`` that refuses a mapping repeating a key, at any depth (pyyaml keeps the last one).

    Raises:
        DuplicateKeyError: ``line N: duplicate key 'k' in a.b (first on line M)``.
        yaml.YAMLError: the text is not valid YAML.
    """
    _check_duplicates(yaml.compose(text, Loader=yaml.SafeLoader), "")
    return yaml.safe_load(text)


def _check_duplicates(node, where: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                inside = f" in {where}" if where else ""
                raise DuplicateKeyError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}{inside} "
                                        f"(first on line {seen[key] + 1})")
            seen[key] = key_node.start_mark.line
            _check_duplicates(value_node, f"{where}.{key}" if where else str(key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{where}[{i}]")


def json_pairs_unique(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` for ``json.loads``: refuse an object that repeats a key (json keeps the last)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"duplicate key {key!r}")
        out[key] = value
    return out


def section_class(annotation) -> type[BaseModel] | None:
    """The first config class inside a field's annotation (``Section``, ``Section | None``, ``list[Section]``)."""
    todo = [annotation]
    while todo:
        tp = todo.pop(0)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return tp
        todo += list(typing.get_args(tp))
    return None


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"training": {"seed": 1}}`` -> ``{"training.seed": 1}`` (nested dicts to dotted keys)."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
