"""Front doors the sidecar serves itself, beside the ext_proc stream: WebSocket mode on /v1/responses."""
