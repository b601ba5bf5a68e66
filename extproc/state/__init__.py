"""Responses state: pins, sidecar-held conversations, and the stores they live in."""
