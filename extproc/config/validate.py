"""A composed YAML node tree into a Config: the top-level keys and the section each is read by.

A new section is one entry in SECTIONS (its key, and the function that reads its node into the value of
the Config field of the same name) and that field in `model.Config`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import yaml

from extproc.clients import parse_clients, settle
from extproc.config import backends, sections, state
from extproc.config.model import Config, ConfigError, Tenancy
from extproc.config.reader import Reader

SECTIONS: dict[str, Callable[[Reader, yaml.Node], Any]] = {
    "listen_tls": sections.listen_tls, "limits": sections.limits, "discovery": sections.discovery,
    "state": state.state, "tenancy": sections.tenancy, "clients": parse_clients,
    "failover": sections.failover,
}
_SCALARS = {"listen", "log_level", "admin_listen", "usage_accounting", "log_format", "websocket_listen",
            "websocket_gateway", "fast_path"}


def validate(root: yaml.Node | None, source: str, env: Mapping[str, str]) -> Config:
    r = Reader(source, env)
    if root is None:
        raise ConfigError([f"{source}: empty config: at least one backend is required"])
    top = r.mapping(root, "", {"backends", "model_rules", *_SCALARS, *SECTIONS})
    kw: dict[str, Any] = {"source": source, **sections.top_scalars(r, top)}
    for name, parse in SECTIONS.items():
        if name in top and (value := parse(r, top[name])) is not None:
            kw[name] = value
    found = backends.backends(r, root, top)
    rules = sections.rules(r, top["model_rules"]) if "model_rules" in top else []
    kw.setdefault("tenancy", Tenancy())
    settle(r, top.get("backends", root), kw)
    if r.problems:
        raise ConfigError(r.problems)
    return Config(backends=tuple(found), model_rules=tuple(rules), warnings=tuple(r.warnings), **kw)
