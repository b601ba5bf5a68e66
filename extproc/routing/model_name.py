"""What a model name may be: refused with a 400 naming `model` when it holds control characters or
exceeds 256 bytes (sans-IO).

No provider names a model so: a NUL, a newline or a megabyte of name is a probe or a mistake, and
passed on it reaches logs, metrics, state keys and upstreams that each read it their own way. The
processor refuses it wherever it reads a model; the fast path's routes match only names they can
tell are sane (`FAST_PATH_NAME`), so every other name falls through to the processor, which refuses
it or, when it is merely long in UTF-8, routes it.
"""

from __future__ import annotations

import re

from extproc.errors import GatewayError

MAX_MODEL_BYTES = 256
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL, C1 (Unicode category Cc)

# RE2 (Envoy's safe_regex) counts characters, not bytes: ASCII names up to the limit, and any other
# name short enough that its UTF-8 cannot exceed it (4 bytes a character at most).
FAST_PATH_NAME = (f"[\\x20-\\x7e]{{1,{MAX_MODEL_BYTES}}}"
                  f"|[^\\x00-\\x1f\\x7f-\\x9f]{{1,{MAX_MODEL_BYTES // 4}}}")


def check_model_name(model: str) -> None:
    """Refuse a name no model has, before anything routes, logs or stores it."""
    if _CONTROL.search(model):
        raise GatewayError(400, "'model' must not contain control characters", param="model", code="invalid_value")
    if len(model.encode("utf-8", "surrogatepass")) > MAX_MODEL_BYTES:
        raise GatewayError(400, f"'model' is longer than {MAX_MODEL_BYTES} bytes", param="model",
                           code="invalid_value")
