"""The sidecar's YAML configuration: loading, validation with line numbers, typed result.

Validation collects every problem instead of stopping at the first, so `extproc check-config`
can print them all at once. `model` holds the typed result, `reader` the YAML node checks every
section shares, and one module per section turns its nodes into its dataclass (`validate` puts
them together).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import yaml

from extproc.config.model import (
    MAX_TOKENS_FIELDS,
    STORES,
    Backend,
    Config,
    ConfigError,
    Discovery,
    Endpoint,
    Failover,
    Hosted,
    Limits,
    ListenTLS,
    ModelRule,
    State,
    Tenancy,
    Unserved,
)
from extproc.config.validate import validate

__all__ = ["MAX_TOKENS_FIELDS", "STORES", "Backend", "Config", "ConfigError", "Discovery", "Endpoint", "Failover", "Hosted", "Limits",
           "ListenTLS", "ModelRule", "State", "Tenancy", "Unserved", "load_config", "parse_config"]


def load_config(path: str, env: Mapping[str, str] | None = None) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    return parse_config(text, source=path, env=env)


def parse_config(text: str, source: str = "<memory>", env: Mapping[str, str] | None = None) -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ConfigError([f"{where}: invalid YAML: {getattr(e, 'problem', e)}"]) from None
    return validate(node, source, os.environ if env is None else env)
