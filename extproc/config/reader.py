"""The checks every config section shares: typed scalars, mappings with known keys, problems with file:line:key."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

import yaml

ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
T = TypeVar("T", str, int, bool)


class Reader:
    """Reads YAML nodes for the section validators, recording each problem instead of raising."""

    def __init__(self, source: str, env: Mapping[str, str]):
        self.source = source
        self.env = env
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def where(self, node: yaml.Node | None, key: str, msg: str) -> str:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        return f"{self.source}{line}: {key}: {msg}"

    def problem(self, node: yaml.Node | None, key: str, msg: str) -> None:
        self.problems.append(self.where(node, key, msg))

    def warning(self, node: yaml.Node | None, key: str, msg: str) -> None:
        self.warnings.append(self.where(node, key, msg))

    def mapping(self, node: yaml.Node | None, key: str, allowed: set[str]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, key, "must be a mapping")
            return {}
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            name = k.value if isinstance(k, yaml.ScalarNode) else None
            if name not in allowed:
                self.problem(k, f"{key}.{name}" if key else str(name),
                             f"unknown key (allowed: {', '.join(sorted(allowed))})")
            elif name in out:
                self.problem(k, f"{key}.{name}" if key else name, "duplicate key")
            else:
                out[name] = v
        return out

    def scalar(self, node: yaml.Node, key: str, kind: type[T]) -> T | None:
        if not isinstance(node, yaml.ScalarNode):
            self.problem(node, key, f"must be a {kind.__name__}")
            return None
        value = yaml.safe_load(yaml.serialize(node))
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            self.problem(node, key, f"must be a {kind.__name__}, got {value!r}")
            return None
        return value

    def bounded(self, node: yaml.Node, key: str, lo: int, hi: int) -> int | None:
        v = self.scalar(node, key, int)
        if v is not None and not lo <= v <= hi:
            self.problem(node, key, f"must be between {lo} and {hi}")
        return v

    def string_list(self, node: yaml.Node, key: str) -> list[str]:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, key, "must be a list of strings")
            return []
        out = []
        for i, item in enumerate(node.value):
            v = self.scalar(item, f"{key}[{i}]", str)
            if v is not None:
                out.append(v)
        return out

    def env_name(self, node: yaml.Node, key: str) -> str | None:
        """An environment variable's name (None, with a problem, when it is not one)."""
        var = self.scalar(node, key, str)
        if var is not None and not ENV_RE.match(var):
            self.problem(node, key, "must be an environment variable name")
            return None
        return var

    def secret_env(self, node: yaml.Node, key: str) -> tuple[str | None, str | None]:
        """An environment variable named in the config and its value, which must be set: a secret that
        is missing fails the load rather than connecting without it."""
        var = self.env_name(node, key)
        if var is None:
            return None, None
        if not self.env.get(var):
            self.problem(node, key, f"environment variable {var} is not set or empty")
        return var, self.env.get(var)

    def choice(self, node: yaml.Node, key: str, choices: tuple[str, ...]) -> str | None:
        v = self.scalar(node, key, str)
        if v is not None and v not in choices:
            self.problem(node, key, f"must be one of {', '.join(choices)}, got {v!r}")
            return None
        return v
