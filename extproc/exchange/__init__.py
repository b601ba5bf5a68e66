"""One HTTP exchange through the sidecar, sans-IO: request plan, response handlers."""
