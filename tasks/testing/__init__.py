"""Test doubles that ship with stepforge because users run them too, never imported by a build: the stand-in
OpenAI-compatible policy server (`stepforge serve-policy`, imported lazily by the CLI)."""
