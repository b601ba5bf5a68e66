"""Every answer from a backend that got the gateway's key, read to its end and relieved of the key (sans-IO).

`guard` wraps whatever `response.choose` picked for an exchange to a keyed backend, on every path:

- response headers that carry a form of the key (`location`, `www-authenticate`, an echo) are set
  again without it; Envoy follows no redirect (no route has an internal redirect policy), so a 3xx
  reaches the client only with its `location` scrubbed;
- the body, whatever the handler does with it, goes through a `StreamScrubber`: an answer passed
  through untouched is streamed through the processor to its end rather than left to Envoy, and a
  translated or replaced one is scrubbed as it goes out, error events in 200 streams included;
- a pass-through answer compressed although the request asked for identity is decoded first (gzip,
  deflate) and sent on decoded; one in an encoding the sidecar cannot read is withheld (502).
"""

from __future__ import annotations

from extproc.errors import GatewayError
from extproc.exchange.actions import BUFFERED, STREAMED, Action
from extproc.exchange.plan import Plan
from extproc.exchange.response import Decoder, Identity, Observe, ResponseHandler, Undecodable, decoder_for
from extproc.ops.redact import KeyForms, StreamScrubber, forms_of


def guard(plan: Plan, headers: dict[str, str], end_of_stream: bool, chosen: ResponseHandler) -> ResponseHandler:
    """`chosen` as it is for a backend without a key; else wrapped so the key never leaves in the answer."""
    key = plan.target.backend.api_key
    if not key:
        return chosen
    forms = forms_of(key)
    fixed = forms.headers(headers)
    if end_of_stream:  # no body: only the headers to clean
        return KeyGuard(chosen, forms, fixed, None, body=False)
    passed_on = isinstance(chosen, Observe)  # nothing else reads the body: the guard decodes it
    decoder = decoder_for(headers.get("content-encoding", "identity")) if passed_on else None
    if isinstance(decoder, Undecodable):
        raise GatewayError(502, f"the upstream answered in content-encoding {decoder.encoding!r}, which the "
                                "gateway cannot read to remove its own key: withheld", code="upstream_error_withheld")
    return KeyGuard(chosen, forms, fixed, None if isinstance(decoder, Identity) else decoder)


class KeyGuard:
    """The chosen handler with the key removed from all it lets out, to the answer's last byte (read
    through the processor even where the handler itself would have let the answer go)."""

    def __init__(self, inner: ResponseHandler, forms: KeyForms, fixed: list[tuple[str, str]],
                 decoder: Decoder | None, body: bool = True):
        self.inner: ResponseHandler | None = inner
        self.head = inner
        self.scrubber = StreamScrubber(forms)
        self.fixed, self.decoder, self.has_body = fixed, decoder, body
        self.buffered = False  # Envoy keeps content-length for a buffered body: it must match the new one

    def headers_action(self) -> Action:
        act = self.head.headers_action()
        act.set_headers += self.fixed
        if not self.has_body:
            return act
        act.response_body_mode = act.response_body_mode or STREAMED
        self.buffered = act.response_body_mode == BUFFERED
        if self.decoder is not None:  # sent on decoded
            act.remove_headers = (*act.remove_headers, "content-encoding")
        if not self.buffered:  # scrubbed chunks may be shorter than the upstream's
            act.remove_headers = (*act.remove_headers, "content-length")
        act.done = False
        return act

    def body(self, chunk: bytes, end_of_stream: bool) -> Action:
        plain = self.decoder.decode(chunk, end_of_stream) if self.decoder is not None else chunk
        act = Action()
        if self.inner is not None:
            act = self.inner.body(plain, end_of_stream)
            if act.done:  # the handler has read what it needs; the rest is only scrubbed
                self.inner = None
        out = act.body if act.body is not None else plain
        clean = self.scrubber.feed(out, end_of_stream)
        if act.body is not None or clean != chunk:
            act.body = clean
            if self.buffered:
                act.set_headers = [*((k, v) for k, v in act.set_headers if k != "content-length"),
                                   ("content-length", str(len(clean)))]
        act.done = end_of_stream
        return act
