"""Command line: `extproc serve`, `check-config`, `resolve`, `learned`, `envoy-rules`, `stack`, `demo-backend`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from extproc.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from extproc.routing.modes import Knowledge, Learned


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the ext_proc gRPC sidecar")
    p.add_argument("--config", required=True)
    p.add_argument("--workers", type=int, default=int(os.environ.get("EXTPROC_WORKERS", "1")),
                   help="processes, one per core: worker i listens on the listen port + i (list them all in "
                        "Envoy's extproc cluster); needs a shared state store (sqlite or redis)")
    p = sub.add_parser("check-config", help="print every problem in a config file; exit 1 if any (warnings, such as "
                                            "an unset api_key_env variable, only with --strict)")
    p.add_argument("config")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p = sub.add_parser("resolve", help="print the backend and API mode a model resolves to, and why")
    p.add_argument("--config", required=True)
    p.add_argument("model")
    p = sub.add_parser("learned", help="list (or forget) the model APIs learned at run time, from the state store")
    p.add_argument("--config", required=True)
    p.add_argument("--forget", metavar="BACKEND:MODEL", action="append", default=[],
                   help="drop one learned entry (repeatable); 'all' drops every one")
    sub.add_parser("envoy-rules", help="print the json_to_metadata and sse_to_metadata rules deploy/envoy.yaml "
                                       "must hold (two YAML documents), made from extproc/envoy/names.py")
    p = sub.add_parser("stack", help="run Envoy, the sidecar and the demo backend locally (Ctrl-C stops)")
    p.add_argument("--config", default="deploy/config.yaml")
    p.add_argument("--port", type=int, default=10000, help="Envoy's listener (default: %(default)s)")
    p.add_argument("--envoy-admin-port", type=int, default=0, help="Envoy's admin port (default: a free one)")
    p.add_argument("--extproc-port", type=int, default=0,
                   help="the sidecar's gRPC port, which Envoy dials (default: a free one)")
    p.add_argument("--admin-port", type=int, default=0,
                   help="the sidecar's admin port: /healthz /readyz /metrics (default: a free one)")
    p.add_argument("--websocket-port", type=int, default=0,
                   help="the sidecar's WebSocket-mode port, which Envoy routes to (default: a free one)")
    p.add_argument("--demo-port", type=int, default=8001,
                   help="the demo backend's port (default: %(default)s, where deploy/config.yaml points); "
                        "give 0 to start no demo backend")
    p = sub.add_parser("demo-backend", help="a small chat-only backend that echoes")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "check-config":
        return _check_config(args.config, args.strict)
    if args.command == "resolve":
        return asyncio.run(_resolve(args.config, args.model))
    if args.command == "learned":
        return asyncio.run(_learned(args.config, args.forget))
    if args.command == "envoy-rules":
        _envoy_rules()
        return 0
    if args.command == "serve":
        return _serve(args.config, args.workers)
    if args.command == "stack":
        from extproc.local.stack import StackPorts, run_local

        return run_local(args.config, StackPorts(listen=args.port, envoy_admin=args.envoy_admin_port,
                                                 extproc=args.extproc_port, admin=args.admin_port,
                                                 websocket=args.websocket_port, demo=args.demo_port))
    if args.command == "demo-backend":
        from extproc.local.demo_backend import serve as serve_demo

        serve_demo(args.host, args.port)
    return 0


def _check_config(path: str, strict: bool) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: OK ({len(cfg.backends)} backends, {len(cfg.model_rules)} model rules, "
          f"{len(cfg.warnings)} warnings)")
    from extproc.routing.hosted import describe

    for b in cfg.backends:
        if b.hosted is not None:
            print(f"  {b.name}: {describe(b)}")
    _print_groups(cfg)
    return 1 if strict and cfg.warnings else 0


def _print_groups(cfg: Config) -> None:
    """Which models several backends serve (docs/configuration.md, Failover), and weights that do nothing."""
    from extproc.routing.group_routes import shared_instances
    from extproc.routing.groups import describe, groups

    found = groups(cfg)
    for group in found.values():
        print(f"  group {group.model}: {describe(group)}")
        for address, names in shared_instances(group.backends).items():
            print(f"  note: group {group.model}: {', '.join(names)} share instance {address}: an attempt there is "
                  f"always {names[0]}'s (attempts are told apart by the instance)")
    grouped = {m.backend.name for g in found.values() for m in g.members}
    for b in cfg.backends:
        if b.weight is not None and b.name not in grouped:
            print(f"  note: {b.name}'s weight does nothing: no model it lists by name is listed by another backend")


def _serve(config_path: str, workers: int) -> int:
    from extproc.envoy.server import serve

    try:
        if workers > 1:
            return _supervise(config_path, workers)
        _event_loop_policy()
        asyncio.run(serve(config_path))
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return 1
    return 0


async def _resolve(config_path: str, model: str) -> int:
    """The decision a request for `model` gets: config, the backend's /v1/models (read now) and what the
    state store says was learned."""
    from extproc.api import CHAT, MESSAGES, RESPONSES
    from extproc.routing.classify import Classifier
    from extproc.routing.compile import decide, decide_group
    from extproc.routing.discovery import discover_once
    from extproc.routing.gateway import Gateway
    from extproc.routing.groups import group_for
    from extproc.routing.key_paths import key_paths
    from extproc.routing.modes import Knowledge, Learned, learned_key
    from extproc.state.store import StoreUnavailable, open_store

    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    knowledge = Knowledge()
    backend = Classifier(cfg).backend_for(model)
    if backend is None:
        print(f"{model}: no backend serves this model (the processor answers 404)")
        return 1
    await discover_once(Gateway(cfg, knowledge), knowledge)
    learned = None
    if cfg.state.store != "memory":  # the memory store lives inside each running sidecar
        store = open_store(cfg.state)
        try:
            learned = Learned.loads((await store.get_many((learned_key(backend.name, model),)))[0])
        except StoreUnavailable as e:
            print(f"(state store unavailable: {e})", file=sys.stderr)
        finally:
            await store.close()
    classifier = Classifier(cfg, knowledge)
    res = classifier.resolve(model, learned=learned)
    assert res is not None
    from extproc.routing.hosted import describe

    print(f"model:    {model}\nbackend:  {res.backend.name}\ntarget:   {describe(res.backend)}\nmode:     {res.mode}\n"
          f"decided:  {res.source}\ntranslate: {'allowed' if res.translate else 'off'}")
    fast = False  # some client's requests take the fast path
    grouped = group_for(cfg, model) is not None
    for client in (CHAT, RESPONSES, MESSAGES):
        up = res.upstream_api(client)
        path = decide_group(cfg, classifier, model, client, learned) if grouped else \
            decide(cfg, res, client, learned)
        fast = fast or path.fast
        print(f"{client} client -> {up + ' upstream' if up else 'refused (400)'}; "
              f"{'fast path' if path.fast else 'processor'}: {path.reason}")
    print("(the fast path is taken behind the project's own Envoy config, deploy/envoy.yaml; an Envoy the "
          "sidecar does not configure sends every request through the processor)")
    _print_group(cfg, knowledge, model, learned, fast)
    if res.backend.api_key_env:  # docs/configuration.md, "Which paths get a backend's key"
        print(f"key:      {res.backend.api_key_env}, sent only on {', '.join(key_paths(res.backend))} "
              "(any other path to this backend: 404)")
    else:
        print("key:      none of the gateway's: the client's own credential goes, on any path")
    return 0


def _print_group(cfg: Config, knowledge: Knowledge, model: str, learned: Learned | None, fast: bool) -> None:
    """The model's group, if it is one: each member with the API it serves the model on and its weight,
    and the orders its attempts take: each first member the policy can pick, with its share of requests,
    and the members Envoy tries after it (config order, `group_routes.first_on`)."""
    from extproc.routing.classify import Classifier
    from extproc.routing.failover import Health
    from extproc.routing.group_routes import carriage, first_on
    from extproc.routing.groups import describe, first_shares, group_for

    group = group_for(cfg, model)
    if group is None:
        print("group:    none (one backend serves this model: no failover)")
        return
    classifier = Classifier(cfg, knowledge)
    print(f"group:    {describe(group)}")
    for member in group.members:
        res = classifier.resolve_on(member.backend, model, learned=learned if member.backend is group.primary else None)
        print(f"  member {member.backend.name}: mode {res.mode} ({res.source})"
              + (f", weight {member.weight}" if member.weight is not None else ""))
    limit = cfg.failover.max_attempts
    firsts = first_shares(group, Health(cfg.failover), 0.0)
    orders = [(share, " -> ".join(b.name for b in first_on(group.backends, first)[:limit])) for first, share in firsts]
    if len(orders) == 1:
        first = firsts[0][0]
        why = "config order while every member is in" if first is group.primary else \
            f"{group.primary.name} cannot serve now, so {first.name} comes first; the later attempts in config order"
        print(f"attempts: {orders[0][1]} (at most {limit}; {why})")
    else:
        print(f"attempts: at most {limit}; the first by weight, by a hash of the request's placement key "
              "(prompt_cache_key, user, safety_identifier or a session header: one conversation keeps its first "
              "member; a random key without one), the later ones in config order; the share of requests each takes:")
        for share, order in orders:
            print(f"          {100 * share:3.0f}%  {order}")
        if fast:
            print("          (on the fast path the same orders by the same shares, picked by Envoy at random per "
                  "request: one conversation does not keep its first member there)")
    print("          a member held off or taken out is not tried first; a conversation the sidecar holds "
          "goes first to the member of its last turn while that member is in")
    print(f"envoy:    {carriage(group.backends)}")


def _envoy_rules() -> None:
    """What to paste into deploy/envoy.yaml after changing extproc/envoy/names.py (a test compares them)."""
    import yaml

    from extproc.envoy.names import json_to_metadata_rules, sse_to_metadata_rules

    print("# json_to_metadata: the typed_config of the match_delegate's extension_config")
    print(yaml.safe_dump(json_to_metadata_rules(), sort_keys=False, default_flow_style=None, width=120), end="")
    print("---\n# sse_to_metadata: its typed_config")
    print(yaml.safe_dump({"response_rules": sse_to_metadata_rules()}, sort_keys=False, default_flow_style=None, width=120), end="")


async def _learned(config_path: str, forget: list[str]) -> int:
    from extproc.routing.modes import forget_learned, list_learned
    from extproc.state.store import StoreUnavailable, open_store

    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    if cfg.state.store == "memory":
        print("state.store is memory: learned modes live inside each running sidecar; use sqlite or redis "
              "to share and inspect them", file=sys.stderr)
        return 1
    store = open_store(cfg.state)
    try:
        if forget:
            gone = await forget_learned(store, forget, everything="all" in forget)
            print(f"forgot {len(gone)} learned entries (each replica's copy expires within 30 s)")
            return 0
        for name, fact in (await list_learned(store)).items():
            print(f"{name}\tneeds={fact.mode or '-'}\tanswered_on={','.join(sorted(fact.ok)) or '-'}")
        return 0
    except StoreUnavailable as e:
        print(f"state store unavailable: {e}", file=sys.stderr)
        return 1
    finally:
        await store.close()


def _event_loop_policy() -> None:
    """uvloop when installed: measured about 20% more requests per second through grpc.aio here."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _shift(address: str, by: int) -> str:
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + by}"


def _supervise(config_path: str, workers: int) -> int:
    """Run `workers` sidecar processes on consecutive ports; signals go to all of them.

    gRPC keeps few long-lived HTTP/2 connections, so SO_REUSEPORT would leave most workers idle:
    distinct ports listed as endpoints of Envoy's extproc cluster spread the streams instead."""
    cfg = load_config(config_path)
    if cfg.state.store == "memory":
        raise ConfigError([f"{config_path}: state.store: workers > 1 need a store they share (sqlite or redis); "
                           "with memory each worker would hold its own pins and conversations"])
    listen = os.environ.get("EXTPROC_LISTEN", cfg.listen)
    admin = os.environ.get("EXTPROC_ADMIN_LISTEN", cfg.admin_listen or "off")
    procs = []
    for i in range(workers):
        env = {**os.environ, "EXTPROC_WORKERS": "1", "EXTPROC_LISTEN": _shift(listen, i),
               "EXTPROC_ADMIN_LISTEN": admin if admin == "off" else _shift(admin, i)}
        procs.append(subprocess.Popen([sys.executable, "-m", "extproc", "serve", "--config", config_path], env=env))

    def forward(sig: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    codes = [p.wait() for p in procs]
    return max(codes)
