"""The response side: one handler per kind of answer, chosen once at response headers (sans-IO).

`kind_of` reads what the request's plan needs (`routing.needs.Need`) and the answer's status and headers,
and names the one `AnswerKind` of the answer; `choose` returns that kind's handler, which owns the
rest of the exchange (the first rule that applies, in this order):

| kind / handler     | when                                                       | Envoy sends the body |
|--------------------|------------------------------------------------------------|----------------------|
| TranslateStream    | a translated 2xx SSE stream                                | STREAMED             |
| ReplayAsStream     | a translated 2xx JSON answer to a streamed request         | BUFFERED             |
| TranslateBuffered  | any other translated answer                                | BUFFERED             |
| ExplainLostPin     | a request routed by a pin got Envoy's 503                  | BUFFERED             |
| LearnRejection     | a model of unknown API got a 400/404/405/422               | BUFFERED             |
| ScrubKey           | an untranslated error from a backend given our key         | BUFFERED             |
| Observe            | anything else: learned as answered, its id or usage read,  | STREAMED, or none    |
|                    | its Response appended to the conversation it continues     |                      |

Upstream bytes are untrusted: whatever a translator cannot use becomes a 502 `bad_upstream_response`
in the client's shape, or mid-stream the client's terminal error events. A translated answer whose
status is neither a success nor an error (a 304, a 1xx, a 999) is such a 502 too.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import orjson

from extproc.api import PATHS
from extproc.envoy.names import LEARNABLE_STATUSES
from extproc.errors import GatewayError, bad_upstream, error_doc, upstream_error_payload, usable_status
from extproc.exchange.actions import BUFFERED, STREAMED, Action, Writes, new_body
from extproc.exchange.first_contact import retried_as
from extproc.exchange.plan import Plan
from extproc.ops.redact import forms_of
from extproc.ops.usage import (
    Usage,
    UsageScanner,
    estimate,
    model_of,
    request_text_bytes,
    text_bytes,
    usage_of,
)
from extproc.routing.modes import rejection_needs
from extproc.routing.needs import USAGE, Need
from extproc.state.conversations import AnswerReader
from extproc.state.pinning import IdRecorder
from extproc.translate.pairs import Answer, StreamTranslator

log = logging.getLogger("extproc")

# What Envoy's reply says when it could not reach the upstream instance at all.
_UNREACHABLE = (b"upstream connect error", b"no healthy upstream", b"upstream_reset_before_response_started",
                b"delayed_connect_error")
_SSE = ("content-type", "text/event-stream; charset=utf-8")


class ResponseHandler(Protocol):
    def headers_action(self) -> Action: ...
    def body(self, chunk: bytes, end_of_stream: bool) -> Action: ...


# -- decoding a translated answer -------------------------------------------------------------------

class Decoder(Protocol):
    def decode(self, chunk: bytes, end: bool) -> bytes: ...


class Identity:
    def decode(self, chunk: bytes, end: bool) -> bytes:
        return chunk


class Inflate:
    """gzip or zlib, auto-detected."""

    def __init__(self) -> None:
        self.z = zlib.decompressobj(wbits=47)

    def decode(self, chunk: bytes, end: bool) -> bytes:
        try:
            out = self.z.decompress(chunk)
            return out + self.z.flush() if end else out
        except zlib.error as e:
            raise GatewayError(502, f"the upstream sent a corrupt compressed body: {e}",
                               code="upstream_encoding") from None


class Undecodable:
    def __init__(self, encoding: str):
        self.encoding = encoding

    def decode(self, chunk: bytes, end: bool) -> bytes:
        raise GatewayError(502, f"the upstream answered with content-encoding {self.encoding!r}, "
                                "which the sidecar cannot translate", code="upstream_encoding")


def decoder_for(encoding: str) -> Decoder:
    encoding = encoding.strip().lower() or "identity"
    if encoding == "identity":
        return Identity()
    return Inflate() if encoding in ("gzip", "deflate") else Undecodable(encoding)


# -- the handlers ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Reply:
    """The answer's status and headers, as the handlers read them."""

    status: int
    headers: dict[str, str]

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def sse(self) -> bool:
        return self.headers.get("content-type", "").lower().startswith("text/event-stream")

    @property
    def encoding(self) -> str:
        return self.headers.get("content-encoding", "identity")


class Outcome:
    """What the answer taught the exchange, read by the shell for metrics and logs."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.model: str | None = None  # the model the upstream's answer named (the GenAI response model)
        self.learned_fact: str | None = None  # needs_<api> | answers_<api>

    def account(self, plan: Plan, status: int, usage: Usage | None, output_bytes: Callable[[], int],
                model: str | None = None) -> None:
        """Usage as reported; estimated only when a successful answer reported none. `model`: the one
        the answer named, if it named one."""
        if usage is None and 200 <= status < 300:
            usage = estimate(request_text_bytes(plan.request), output_bytes())
        self.usage = usage
        self.model = model


class Translated:
    """A handler of a translated answer: its pair, and how its body is decoded."""

    def __init__(self, plan: Plan, reply: Reply, outcome: Outcome):
        assert plan.pair is not None
        self.plan, self.pair, self.status, self.outcome = plan, plan.pair, reply.status, outcome
        self.decoder = decoder_for(reply.encoding)
        self.remove: tuple[str, ...] = ("content-length",)
        if not isinstance(self.decoder, Identity):
            self.remove += ("content-encoding",)


class TranslateBuffered(Translated):
    def headers_action(self) -> Action:
        return Action(set_headers=[("content-type", "application/json"), *self.plan.notes()],
                      remove_headers=self.remove, response_body_mode=BUFFERED)

    def body(self, chunk: bytes, end_of_stream: bool) -> Action:
        data = self.decoder.decode(chunk, end_of_stream)
        if not 200 <= self.status < 300:  # scrubbed before it is read: a text body's message is cut at 2000
            # characters, and the key guard, scrubbing what goes out, would not know a key cut in half
            payload = upstream_error_payload(self.status, scrub(data, self.plan))
            return new_body(orjson.dumps(error_doc(self.plan.client_api, self.status, payload)))
        doc, answer = self._translate(data)
        self.outcome.account(self.plan, self.status, usage_of(doc), lambda: text_bytes(data), model_of(doc))
        return new_body(orjson.dumps(answer.body), writes=self.plan.answered(answer.response))

    def _translate(self, data: bytes) -> tuple[dict[str, Any], Answer]:
        """The upstream's answer checked and translated: its JSON object, and the client's answer."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise bad_upstream("the body is not JSON") from None
        if not isinstance(doc, dict):
            raise bad_upstream("the body is not a JSON object")
        try:
            return doc, self.pair.response(doc)
        except GatewayError:  # the translator named the field it could not use, or the upstream's own failure
            raise
        except Exception as e:  # the translator met a shape it cannot use
            raise bad_upstream(_why(e)) from None


class ReplayAsStream(TranslateBuffered):
    """A streamed request answered with one JSON body (a provider that ignores `stream`): checked and
    translated as any buffered answer is, then sent as the complete stream the client asked for, by
    the stream translator fed the upstream's answer as the stream that would have carried it. An
    answer it cannot use ends that stream the way a broken stream ends."""

    def __init__(self, plan: Plan, reply: Reply, outcome: Outcome):
        super().__init__(plan, reply, outcome)
        self.translator = self.pair.stream()

    def headers_action(self) -> Action:
        return Action(set_headers=[_SSE, *self.plan.notes()], remove_headers=self.remove, response_body_mode=BUFFERED)

    def body(self, chunk: bytes, end_of_stream: bool) -> Action:
        try:
            doc, _ = self._translate(self.decoder.decode(chunk, end_of_stream))
            out = self.translator.replay(doc)
        except Exception as e:
            return new_body(_failed(self.translator, e))
        return new_body(out, writes=_ended(self.plan, self.translator, self.outcome))


class TranslateStream(Translated):
    def __init__(self, plan: Plan, reply: Reply, outcome: Outcome):
        super().__init__(plan, reply, outcome)
        self.translator: StreamTranslator = self.pair.stream()

    def headers_action(self) -> Action:
        return Action(set_headers=[_SSE, *self.plan.notes()], remove_headers=self.remove, response_body_mode=STREAMED)

    def body(self, chunk: bytes, end_of_stream: bool) -> Action:
        try:
            out = self.translator.feed(self.decoder.decode(chunk, end_of_stream))
            if not end_of_stream:
                return Action(body=out)
            out += self.translator.close()
        except Exception as e:  # a chunk the translator cannot use (or cannot decode): end the stream properly
            return Action(body=_failed(self.translator, e), done=True)
        return Action(body=out, writes=_ended(self.plan, self.translator, self.outcome), done=True)


def _failed(translator: StreamTranslator, e: Exception) -> bytes:
    """The client's stream ended with an error event: the GatewayError's own, else a 502's."""
    err = e if isinstance(e, GatewayError) else bad_upstream(_why(e))
    return translator.fail(err.code or "upstream_error", err.message)


def _ended(plan: Plan, translator: StreamTranslator, outcome: Outcome) -> Writes:
    """A translated stream that ended: its usage counted, its Response kept for the next turn."""
    final = translator.response
    outcome.account(plan, 200, usage_of(final), lambda: text_bytes(orjson.dumps(final.get("output"))) if final else 0,
                    translator.upstream_model)
    return plan.answered(final)


class Buffered:
    """A handler of an untranslated answer that reads it whole and changes nothing at its headers."""

    def __init__(self, plan: Plan, reply: Reply, outcome: Outcome):
        self.plan, self.status, self.encoding, self.outcome = plan, reply.status, reply.encoding, outcome

    def headers_action(self) -> Action:
        return Action(response_body_mode=BUFFERED)


class ExplainLostPin(Buffered):
    """Envoy's own 503 for a pinned request means the instance holding the response is gone."""

    def body(self, chunk: bytes, end_of_stream: bool) -> Action:
        if not any(sign in chunk for sign in _UNREACHABLE):
            return Action(done=True)
        t = self.plan.target
        where = f"instance {t.endpoint} of backend '{t.backend.name}'"
        return new_body(GatewayError(503, f"'{self.plan.pinned_id}' is held by {where}, which is not "
                                          "answering; retry later", code="pinned_backend_unavailable").body())


class ScrubKey(Buffered):
    """An untranslated error from a backend that got the sidecar's own key: read (decoded, when the
    upstream compressed it for a client that accepts that) so that the key guard, which scrubs all
    that goes out (exchange/key_guard.py), can remove the key. One in an encoding the sidecar cannot
    read is withheld: it may quote the key."""

    def body(self, chunk: bytes, end_of_stream: bool) -> Action:
        return self.readable(chunk, _plain(chunk, self.encoding))

    def readable(self, chunk: bytes, plain: bytes | None) -> Action:
        """The body as the guard can read it: `chunk` decoded to `plain` (None: it could not be)."""
        if plain is None:
            withheld = GatewayError(self.status, f"the upstream's error, in content-encoding {self.encoding!r}, "
                                                 "is withheld: the gateway cannot read it to remove its own key",
                                    code="upstream_error_withheld")
            return new_body(withheld.body(self.plan.client_api), remove_headers=("content-encoding",))
        return new_body(plain, remove_headers=("content-encoding",)) if plain != chunk else Action(done=True)


class LearnRejection(ScrubKey):
    """The upstream may say the model needs the other API: remember it, and say a retry will work.
    Any other rejection goes to the client as it is, without the key."""

    def body(self, chunk: bytes, end_of_stream: bool) -> Action:
        plan = self.plan
        facts = plan.facts
        assert facts is not None and plan.client_api is not None
        plain = _plain(chunk, self.encoding)  # a rejection compressed for the client is read as well
        needs = rejection_needs(self.status, plain or b"", plan.client_api)
        if needs is None:
            return self.readable(chunk, plain)
        log.info("model=%s backend=%s: learned that it needs the %s API", plan.model, plan.target.backend.name, needs)
        writes = facts.needs(needs)
        self.outcome.learned_fact = "needs_" + needs
        path = PATHS[needs]
        retry = "retry the request: it will be translated" if plan.target.backend.translate else \
            f"call {path} instead"
        body = GatewayError(self.status, f"The model '{plan.model}' is only available on {path} at this backend; "
                                         f"the gateway has learned this, {retry}.",
                            param="model", code="model_api_learned").body()
        return new_body(body, writes=writes, write_ttl=facts.ttl, remove_headers=("content-encoding",))


def _plain(chunk: bytes, encoding: str) -> bytes | None:
    """A whole untranslated answer decoded (gzip, deflate); None in an encoding the sidecar cannot read,
    or corrupt."""
    try:
        return decoder_for(encoding).decode(chunk, True)
    except GatewayError:
        return None


def scrub(body: bytes, plan: Plan) -> bytes:
    """An upstream error that quotes the key the sidecar sent it (some providers echo a rejected key),
    without it, before a translator reads it."""
    key = plan.target.backend.api_key
    return forms_of(key).scrub(body) if key else body  # raw, JSON-escaped, URL-encoded, base64


class Observe:
    """An answer in the client's own API, passed on untouched: what it teaches of the model's API
    recorded, its id pinned, its usage read (unless Envoy counts it: `Plan.envoy_counts`), its
    Response appended to the conversation it continues, and on success what the call removed
    forgotten (`Plan.forgets`), as the plan needs (or nothing more to do)."""

    def __init__(self, plan: Plan, reply: Reply, outcome: Outcome):
        self.plan, self.outcome = plan, outcome
        self.writes: Writes = []
        retried = retried_as(plan, reply.headers)
        if retried is not None:  # the upstream side learned it, and translated and recorded the answer
            outcome.learned_fact = "needs_" + retried
        elif Need.LEARN in plan.needs and reply.ok:
            assert plan.facts is not None
            self.writes = plan.facts.answered()
            outcome.learned_fact = "answers_" + (plan.client_api or "")
        if reply.ok:
            self.writes = [*self.writes, *plan.forgets]
        self.recorder = IdRecorder(plan.pinning.tenant, plan.target, reply.sse, plan.pins) \
            if Need.RECORD_ID in plan.needs and reply.status == 200 and retried is None else None
        self.scanner = UsageScanner(sse=reply.sse) if plan.needs & USAGE and reply.ok and not plan.envoy_counts \
            else None
        # Need.CONVERSATION: a first contact's retried answer too, translated into the client's API
        self.reader = AnswerReader(reply.sse, plan.pinning.gw.config.state.max_record_bytes) \
            if plan.conversation is not None and reply.ok else None

    def headers_action(self) -> Action:
        reads = self.recorder is not None or self.scanner is not None or self.reader is not None
        return Action(response_body_mode=STREAMED if reads else None, writes=self.writes,
                      write_ttl=self.plan.learned_ttl(self.writes), done=not reads)

    def body(self, chunk: bytes, end_of_stream: bool) -> Action:
        writes: Writes = []
        if self.recorder is not None and not self.recorder.done:
            writes = self.recorder.feed(chunk, end_of_stream)
        scanner = self.scanner
        if scanner is not None:
            scanner.feed(chunk)
            if end_of_stream:
                scanner.finish()
                self.outcome.account(self.plan, 200, scanner.usage, lambda: scanner.output_bytes, scanner.model)
        if self.reader is not None:
            self.reader.feed(chunk, end_of_stream)
            if end_of_stream:
                writes = [*writes, *self.plan.answered(self.reader.response)]
        reading_id = self.recorder is not None and not self.recorder.done
        return Action(writes=writes, done=end_of_stream or (scanner is None and self.reader is None and not reading_id))


class AnswerKind(StrEnum):
    """What the rest of an answer is, decided once at its headers (`kind_of`): each has one handler."""

    TRANSLATE_BUFFERED = "translate_buffered"
    TRANSLATE_STREAM = "translate_stream"
    REPLAY_AS_STREAM = "replay_as_stream"
    EXPLAIN_LOST_PIN = "explain_lost_pin"
    LEARN_REJECTION = "learn_rejection"
    SCRUB_KEY = "scrub_key"
    OBSERVE = "observe"


_HANDLERS: dict[AnswerKind, Callable[[Plan, Reply, Outcome], ResponseHandler]] = {
    AnswerKind.TRANSLATE_BUFFERED: TranslateBuffered, AnswerKind.TRANSLATE_STREAM: TranslateStream,
    AnswerKind.REPLAY_AS_STREAM: ReplayAsStream, AnswerKind.EXPLAIN_LOST_PIN: ExplainLostPin,
    AnswerKind.LEARN_REJECTION: LearnRejection, AnswerKind.SCRUB_KEY: ScrubKey, AnswerKind.OBSERVE: Observe,
}


def kind_of(plan: Plan, reply: Reply) -> AnswerKind:
    """The answer's kind, from what the plan needs and the answer's status and headers."""
    status = reply.status
    if Need.TRANSLATE in plan.needs:
        if not usable_status(status):
            raise bad_upstream(f"status {status}")
        if plan.stream and reply.ok and not isinstance(decoder_for(reply.encoding), Undecodable):
            return AnswerKind.TRANSLATE_STREAM if reply.sse else AnswerKind.REPLAY_AS_STREAM
        return AnswerKind.TRANSLATE_BUFFERED
    if plan.pinned_id is not None and status == 503:
        return AnswerKind.EXPLAIN_LOST_PIN
    if retried_as(plan, reply.headers) is None:
        if Need.LEARN in plan.needs and status in LEARNABLE_STATUSES:
            return AnswerKind.LEARN_REJECTION
        if Need.INJECT_KEY in plan.needs and status >= 400:
            return AnswerKind.SCRUB_KEY
    return AnswerKind.OBSERVE


def choose(plan: Plan, status: int, headers: dict[str, str], outcome: Outcome) -> ResponseHandler:
    """The handler that owns the rest of the answer."""
    reply = Reply(status, headers)
    return _HANDLERS[kind_of(plan, reply)](plan, reply, outcome)


def _why(e: Exception) -> str:
    if isinstance(e, GatewayError):
        return e.message
    return f"{type(e).__name__} while reading it"
