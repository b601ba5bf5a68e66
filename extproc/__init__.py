"""Envoy ext_proc sidecar bridging the OpenAI Chat Completions and Responses APIs."""
