"""Command line: `extproc serve`, `check-config`, `resolve`, `stack`, `demo-backend`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the ext_proc gRPC sidecar")
    p.add_argument("--config", required=True)
    p = sub.add_parser("check-config", help="print every problem in a config file; exit 1 if any")
    p.add_argument("config")
    p = sub.add_parser("resolve", help="print the backend and API mode a model resolves to, and why")
    p.add_argument("--config", required=True)
    p.add_argument("model")
    p = sub.add_parser("stack", help="run Envoy, the sidecar and the demo backend locally (Ctrl-C stops)")
    p.add_argument("--config", default="deploy/config.yaml")
    p.add_argument("--port", type=int, default=10000)
    p.add_argument("--demo-port", type=int, default=8001, help="0 to not start the demo backend")
    p = sub.add_parser("demo-backend", help="a small chat-only backend that echoes")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    if args.command == "check-config":
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            return 1
        print(f"{args.config}: OK ({len(cfg.backends)} backends, {len(cfg.model_rules)} model rules)")
        return 0
    if args.command == "resolve":
        from .classify import CHAT, RESPONSES, Classifier

        try:
            res = Classifier(load_config(args.config)).resolve(args.model)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 1
        if res is None:
            print(f"{args.model}: no backend serves this model")
            return 1
        print(f"model:    {args.model}\nbackend:  {res.backend.name}\nmode:     {res.mode}\n"
              f"decided:  {res.source}\ntranslate: {'allowed' if res.translate else 'off'}")
        for client in (CHAT, RESPONSES):
            up = res.upstream_api(client)
            print(f"{client} client -> {up + ' upstream' if up else 'refused (400)'}")
        return 0
    if args.command == "serve":
        from .server import serve

        try:
            asyncio.run(serve(args.config))
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            return 1
        return 0
    if args.command == "stack":
        from .stack import run_local

        return run_local(args.config, port=args.port, demo_port=args.demo_port)
    if args.command == "demo-backend":
        from .demo_backend import serve as serve_demo

        serve_demo(args.host, args.port)
    return 0
