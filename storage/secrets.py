"""Telling whether a URL carries a credential, so configs that are copied into manifests, Prefect's flow
parameters and request logs can refuse it before anything is stored.

A credential can sit anywhere in a URL: userinfo (`user:key@host`), the query (`?api-key=...`, Azure;
`?key=...`, Google; `?sig=...`, SAS), a path segment (`/v1/sk-.../`, `/key=.../`, proxies that take the key
in the path) or the fragment. The check never returns the value it found, only where it is.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["env_secret_problem", "recorded_config", "url_credential_problem"]

# Parameter names (lower case, without - and _) that carry credentials: `api-key` (Azure), `key` (Google),
# `token`, `access_token`, `sig` (SAS), ... A substring match, so `x-api-key` is caught too.
_SECRET_NAME_PARTS = ("key", "token", "secret", "passw", "auth", "credential", "signature", "bearer")
_SECRET_NAMES = {"sig", "pwd", "code", "pass"}
# Path segments after which gateways take the key itself (`/key/<key>/v1`).
_KEY_SEGMENTS = {"key", "apikey", "token", "accesstoken", "secret", "password", "bearer"}
# Prefixes of well-known key formats: OpenAI/Anthropic `sk-`, Hugging Face `hf_`, GitHub `ghp_`/`github_pat_`,
# Slack `xox?-`, AWS access key ids `AKIA`/`ASIA`, Google `AIza`, Groq `gsk_`, Replicate `r8_`, JWTs `eyJ`.
_KEY_PREFIX_RE = re.compile(
    r"^(sk|pk|rk)[-_][A-Za-z0-9_-]{8,}|^(hf|ghp|gho|ghs|ghu|gsk|r8)_[A-Za-z0-9]{8,}|^github_pat_|"
    r"^xox[abprs]-|^(AKIA|ASIA)[A-Z0-9]{12,}|^AIza[0-9A-Za-z_-]{20,}|^eyJ[A-Za-z0-9_-]{10,}\.")
# Random tokens: 24+ base62/base64url characters mixing upper case, lower case and digits (model and
# deployment names are words joined by `-`, rarely mixed case), or 32+ hex digits.
_TOKENISH_RE = re.compile(r"^[A-Za-z0-9_\-+=]{24,}$")
_HEX_RE = re.compile(r"^[0-9a-fA-F]{32,}$")


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _secret_name(name: str) -> bool:
    norm = _norm(name)
    return norm in _SECRET_NAMES or any(part in norm for part in _SECRET_NAME_PARTS)


def _key_like(text: str) -> bool:
    """Whether one path segment or fragment looks like a key itself."""
    if _KEY_PREFIX_RE.search(text):
        return True
    if _HEX_RE.match(text):
        return True
    if _TOKENISH_RE.match(text):
        return any(c.isupper() for c in text) and any(c.islower() for c in text) and \
            sum(c.isdigit() for c in text) >= 3
    return False


def url_credential_problem(url: str) -> str | None:
    """Why `url` may not be stored because it carries (or may carry) a credential; None when it does not.
    The answer names the part of the URL, never its value."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None  # malformed URLs are reported by the field's own validator
    if "@" in parts.netloc:
        return "embeds credentials (user:secret@host)"
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        if _secret_name(name):
            return f"carries a credential in its query string (`{name}=`)"
    if parts.fragment:
        # A fragment is never sent to a server, so it has no use in an endpoint URL; it may hold a key.
        return "has a fragment (`#...`), which may hold a credential and is never sent to the server"
    segments = unquote(parts.path).split("/")
    for i, segment in enumerate(segments):
        if _norm(segment) in _KEY_SEGMENTS and any(segments[i + 1:]):
            return f"carries a credential in its path (after `/{segment}/`)"
        # Matrix parameters (`;key=...`) and `name=value` segments some gateways use.
        for piece in re.split(r"[;,]", segment):
            name, eq, _ = piece.partition("=")
            if eq and _secret_name(name):
                return f"carries a credential in its path (`{name}=`)"
            if _key_like(piece):
                return "has a path segment that looks like an API key or token"
    return None


def env_secret_problem(name: str, value: str) -> str | None:
    """Why the environment variable `name=value` may not sit in a config, or None. Configs are Prefect flow
    parameters (stored by the server, shown in the UI, sent to every fanned-out shard run), so a credential
    must stay in the environment of the process that runs the subprocess, which inherits it. The answer
    names the variable, never its value."""
    if _secret_name(name):
        return f"`{name}` is named like a credential"
    if _key_like(value.strip()):
        return f"the value of `{name}` looks like an API key or token"
    try:
        has_host = bool(urlsplit(value.strip()).netloc)  # a URL (user:secret@host, ?key=...)
    except ValueError:
        has_host = False  # malformed: not a URL a client would use
    if has_host:
        problem = url_credential_problem(value.strip())
        if problem is not None:
            return f"the value of `{name}` is a URL that {problem}"
    return None


def recorded_config(data: dict) -> dict:
    """A dumped config as manifests record it: the values of every `env` mapping (extra environment variables
    for a subprocess such as a Lean REPL, which may hold a key) are replaced, their names kept. Returns a
    new dict; `data` is not changed."""
    def walk(node):
        if isinstance(node, dict):
            return {k: ({name: "(set; value not recorded)" for name in v} if k == "env" and isinstance(v, dict)
                        else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(data)
