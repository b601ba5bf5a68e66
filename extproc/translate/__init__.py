"""Sans-IO translators between the Chat Completions and Responses APIs, one module per direction.

- `req_chat_to_responses`: a Chat client's request for a Responses-only model.
- `resp_responses_to_chat`: that model's Response back into a chat.completion.
- `req_responses_to_chat`: a Responses client's request for a chat-only backend.
- `resp_chat_to_responses`: that backend's chat.completion back into a Response.
Dicts in, dicts out; a request that cannot be translated raises `GatewayError` (a 400 naming the field).
The upstream's answers are read through the typed models of `wire` (a 502 naming the field).
"""
