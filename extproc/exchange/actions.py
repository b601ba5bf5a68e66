"""What the exchange tells the shell to do for one Envoy message: plain data."""

from __future__ import annotations

from dataclasses import dataclass, field

from extproc.errors import GatewayError
from extproc.state.background import Run
from extproc.state.lookup import Lookup

BUFFERED, STREAMED = "BUFFERED", "STREAMED"
Writes = list[tuple[str, bytes | None]]  # store writes; None deletes


@dataclass(slots=True)
class Action:
    """What to tell Envoy in reply to one message."""

    set_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: tuple[str, ...] = ()
    body: bytes | None = None  # replacement body, None leaves it untouched
    clear_route_cache: bool = False
    immediate: tuple[int, bytes, str] | None = None  # (status, body, content-type): answer without upstream
    response_body_mode: str | None = None  # ask Envoy for the response body: BUFFERED or STREAMED
    writes: Writes = field(default_factory=list)  # store writes, made before the reply goes on
    write_ttl: int | None = None  # seconds; None: the store's default
    done: bool = False  # nothing more to do for this exchange: close the ext_proc stream
    background: Run | None = None  # a background turn the shell runs once the writes are made


Step = Action | Lookup[Action]


def error_action(err: GatewayError, api: str | None = None) -> Action:
    """The sidecar's own answer with an error, in the shape of the client's API."""
    return Action(immediate=(err.status, err.body(api), "application/json"), set_headers=list(err.headers), done=True)


def answer(status: int, body: bytes, writes: Writes | None = None, headers: tuple[tuple[str, str], ...] = ()) -> Action:
    """The sidecar answers the request itself (JSON)."""
    return Action(immediate=(status, body, "application/json"), set_headers=list(headers), writes=writes or [],
                  done=True)


def new_body(body: bytes, **kw: object) -> Action:
    """The answer's body replaced (buffered mode), its content-length with it; the exchange ends."""
    return Action(body=body, set_headers=[("content-length", str(len(body)))], done=True, **kw)  # type: ignore[arg-type]
