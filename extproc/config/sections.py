"""The small sections: top-level scalars, listen_tls, limits, discovery, tenancy, failover, model_rules."""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from extproc.api import API_MODES
from extproc.config.model import Discovery, Failover, Limits, ListenTLS, ModelRule, Tenancy
from extproc.config.reader import Reader

_HEADER_RE = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_OFF = ("off", "", "null", "~")


def top_scalars(r: Reader, top: dict[str, yaml.Node]) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if "listen" in top:
        listen = r.scalar(top["listen"], "listen", str)
        if listen is not None:
            kw["listen"] = listen
    for key in ("admin_listen", "websocket_listen"):
        if key in top:
            kw[key] = None if top[key].value in _OFF else r.scalar(top[key], key, str)
    if "websocket_gateway" in top:
        url = r.scalar(top["websocket_gateway"], "websocket_gateway", str)
        if url is not None and not re.match(r"^https?://[^/?#]+$", url):
            r.problem(top["websocket_gateway"], "websocket_gateway", "must be http(s)://host:port, no path")
        elif url is not None:
            kw["websocket_gateway"] = url
    if "usage_accounting" in top:
        kw["usage_accounting"] = r.choice(top["usage_accounting"], "usage_accounting", ("all", "translated"))
    if "fast_path" in top:
        kw["fast_path"] = r.scalar(top["fast_path"], "fast_path", bool)
    if "log_format" in top:
        kw["log_format"] = r.choice(top["log_format"], "log_format", ("json", "text"))
    if "log_level" in top:
        lvl = r.choice(top["log_level"], "log_level", ("debug", "info", "warning", "error"))
        if lvl:
            kw["log_level"] = lvl
    return kw


def listen_tls(r: Reader, node: yaml.Node) -> ListenTLS | None:
    t = r.mapping(node, "listen_tls", {"cert_file", "key_file", "client_ca_file"})
    files: dict[str, str | None] = {}
    for name in ("cert_file", "key_file", "client_ca_file"):
        if name in t:
            path = r.scalar(t[name], f"listen_tls.{name}", str)
            if path is not None and not os.path.isfile(path):
                r.problem(t[name], f"listen_tls.{name}", f"no such file: {path}")
            files[name] = path
        elif name != "client_ca_file":
            r.problem(node, f"listen_tls.{name}", "required")
    cert, key = files.get("cert_file"), files.get("key_file")
    return ListenTLS(cert, key, files.get("client_ca_file")) if cert and key else None


def limits(r: Reader, node: yaml.Node) -> Limits | None:
    lim = r.mapping(node, "limits", {"max_body_bytes", "upstream_timeout_seconds", "websocket_max_seconds",
                                     "background_max_runs", "background_max_seconds", "background_max_events",
                                     "background_max_event_bytes", "background_lease_seconds"})
    before = len(r.problems)
    kw: dict[str, Any] = {}
    if "max_body_bytes" in lim:
        n = r.scalar(lim["max_body_bytes"], "limits.max_body_bytes", int)
        if n is not None and n < 1024:
            r.problem(lim["max_body_bytes"], "limits.max_body_bytes", "must be at least 1024")
        kw["max_body_bytes"] = n
    if "upstream_timeout_seconds" in lim:
        kw["upstream_timeout_seconds"] = r.bounded(lim["upstream_timeout_seconds"],
                                                   "limits.upstream_timeout_seconds", 1, 86400)
    if "websocket_max_seconds" in lim:
        kw["websocket_max_seconds"] = r.bounded(lim["websocket_max_seconds"], "limits.websocket_max_seconds", 1, 86400)
    if "background_max_runs" in lim:
        kw["background_max_runs"] = r.bounded(lim["background_max_runs"], "limits.background_max_runs", 0, 10000)
    if "background_max_seconds" in lim:
        kw["background_max_seconds"] = r.bounded(lim["background_max_seconds"], "limits.background_max_seconds",
                                                 1, 86400)
    if "background_max_events" in lim:
        kw["background_max_events"] = r.bounded(lim["background_max_events"], "limits.background_max_events",
                                                10, 10_000_000)
    if "background_max_event_bytes" in lim:
        kw["background_max_event_bytes"] = r.bounded(lim["background_max_event_bytes"],
                                                     "limits.background_max_event_bytes", 4096, 1024 ** 3)
    if "background_lease_seconds" in lim:
        kw["background_lease_seconds"] = r.bounded(lim["background_lease_seconds"],
                                                   "limits.background_lease_seconds", 3, 600)
    return Limits(**kw) if kw and len(r.problems) == before else None


def discovery(r: Reader, node: yaml.Node) -> Discovery:
    d = r.mapping(node, "discovery", {"interval_seconds", "timeout_ms", "allow_mode_header"})
    kw: dict[str, Any] = {}
    for name, (lo, hi) in {"interval_seconds": (5, 86400), "timeout_ms": (100, 60_000)}.items():
        if name in d:
            kw[name] = r.bounded(d[name], f"discovery.{name}", lo, hi)
    if "allow_mode_header" in d:
        kw["allow_mode_header"] = r.scalar(d["allow_mode_header"], "discovery.allow_mode_header", bool)
    return Discovery(**kw)


def tenancy(r: Reader, node: yaml.Node) -> Tenancy | None:
    m = r.mapping(node, "tenancy", {"header", "secret_env"})
    kw: dict[str, Any] = {}
    if "header" in m:
        header = r.scalar(m["header"], "tenancy.header", str)
        if header is not None and not _HEADER_RE.match(header):
            r.problem(m["header"], "tenancy.header", "must be a lower-case HTTP header name")
        kw["header"] = header
    if "secret_env" in m:
        kw["secret_env"] = r.env_name(m["secret_env"], "tenancy.secret_env")
    return Tenancy(**kw)


_FAILOVER = {"max_attempts": (1, 10), "deadline_seconds": (1, 86400), "eject_after": (1, 1000),
             "eject_seconds": (1, 86400), "max_eject_seconds": (1, 86400), "attempt_timeout_seconds": (1, 86400)}


def failover(r: Reader, node: yaml.Node) -> Failover | None:
    m = r.mapping(node, "failover", set(_FAILOVER))
    before = len(r.problems)
    kw: dict[str, Any] = {name: r.bounded(m[name], f"failover.{name}", lo, hi)
                          for name, (lo, hi) in _FAILOVER.items() if name in m}
    if len(r.problems) > before:
        return None
    settings = Failover(**kw)
    if settings.max_eject_seconds < settings.eject_seconds:
        r.problem(m.get("max_eject_seconds", node), "failover.max_eject_seconds",
                  f"must be at least eject_seconds ({settings.eject_seconds})")
        return None
    return settings


def rules(r: Reader, node: yaml.Node) -> list[ModelRule]:
    if not isinstance(node, yaml.SequenceNode):
        r.problem(node, "model_rules", "must be a list")
        return []
    return [rule for i, rnode in enumerate(node.value) if (rule := _rule(r, rnode, f"model_rules[{i}]")) is not None]


def _rule(r: Reader, node: yaml.Node, key: str) -> ModelRule | None:
    m = r.mapping(node, key, {"match", "mode", "translate"})
    before = len(r.problems)
    if "match" not in m:
        r.problem(node, f"{key}.match", "required")
    match = r.scalar(m["match"], f"{key}.match", str) if "match" in m else None
    mode = r.choice(m["mode"], f"{key}.mode", API_MODES) if "mode" in m else None
    translate = r.scalar(m["translate"], f"{key}.translate", bool) if "translate" in m else None
    if "mode" not in m and "translate" not in m:
        r.problem(node, key, "give 'mode' and/or 'translate'")
    if len(r.problems) > before or match is None:
        return None
    return ModelRule(match=match, mode=mode, translate=translate)
