"""The Envoy-facing shell: the ext_proc gRPC servicer and the process around it."""
