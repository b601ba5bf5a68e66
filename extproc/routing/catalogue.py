"""Built-in knowledge of models that answer on one API only: the last resort before the backend's own API."""

from __future__ import annotations

# (glob, mode). Checked in order; the first match wins.
CATALOGUE: tuple[tuple[str, str], ...] = (
    ("*codex*", "responses"),
    ("o1-pro*", "responses"),
    ("o3-pro*", "responses"),
    ("gpt-5-pro*", "responses"),
    ("gpt-5.*-pro*", "responses"),
    ("*deep-research*", "responses"),
    ("computer-use-preview*", "responses"),
    ("gpt-4o-audio-preview*", "chat"),
    ("gpt-4o-mini-audio-preview*", "chat"),
    ("gpt-4o-search-preview*", "chat"),
    ("gpt-4o-mini-search-preview*", "chat"),
    ("claude-*", "messages"),  # Anthropic's models, on a backend of unknown API (classify: `auto` ones only)
)
