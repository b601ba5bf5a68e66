"""Running the stack locally: Envoy + sidecar + demo backend, for users, tests and benchmarks."""
