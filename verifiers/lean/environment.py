"""`check_lean_environment`: the one preflight check of a Lean backend against the machine it runs on, used
by a build (`verifier.lean`, `formal.lean`), by `stepforge mustard` (`lean`) and, for the key, by the Kimina
client itself, so every caller refuses the same things with the same words, naming its own section."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from storage.errors import ConfigError


def check_kimina_key(lean: Any, where: str) -> None:
    """A Kimina key variable that is named but not set would make every request fail as unauthorised."""
    if getattr(lean, "kind", None) == "kimina" and lean.api_key_env is not None and not os.environ.get(lean.api_key_env):
        raise ConfigError(f"`{where}.api_key_env` names {lean.api_key_env!r}, which is not set or empty; export "
                          "the Kimina API key in it.", field=f"{where}.api_key_env", value=lean.api_key_env)


def check_lean_environment(lean: Any, where: str) -> None:
    """A REPL command that cannot start, or a Kimina key variable that is not set, would make every proof an
    `error` verdict or fail every shard: say so before any work, naming `<where>.command` /
    `<where>.api_key_env`. `where` is the config section of `lean` (`formal.lean`, `lean`)."""
    if lean is None:
        return
    check_kimina_key(lean, where)
    if lean.kind != "repl":
        return
    program = lean.command[0]
    found = shutil.which(program, path=lean.env.get("PATH")) if "/" not in program else (
        program if Path(lean.cwd or ".", program).exists() else None)
    if found is None:
        raise ConfigError(f"`{where}.command`: cannot find {program!r} (not on PATH, or no such file); give "
                          "the REPL's command, e.g. `[lake, env, /path/to/repl/.lake/build/bin/repl]` with "
                          f"`{where}.cwd` set to the Mathlib project.", field=f"{where}.command", value=program)
