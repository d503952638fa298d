"""The LeanDojo adapter at its boundary. LeanDojo (elan, git, a traced repository) is not installed here:
a fake `lean_dojo` module with LeanDojo's names and shapes (`Dojo` as a context manager yielding
`(dojo, initial_state)`, `run_tac` returning `TacticState` / `ProofFinished` / `LeanError` /
`ProofGivenUp`, its timeout and crash exceptions) stands in for it."""

from __future__ import annotations

import asyncio
import sys
import types
from dataclasses import dataclass

import pytest

from storage.errors import ConfigError
from verifiers.base import Status
from verifiers.lean.leandojo import LeanDojoConfig, LeanDojoItem, LeanDojoVerifier
from verifiers.lean.verdict import first_error


@dataclass(frozen=True)
class TacticState:
    pp: str
    id: int


@dataclass(frozen=True)
class ProofFinished:
    tactic_state_id: int
    message: str = ""


@dataclass(frozen=True)
class LeanError:
    error: str


@dataclass(frozen=True)
class ProofGivenUp:
    pass


class DojoTacticTimeoutError(Exception):
    pass


class DojoCrashError(Exception):
    pass


# The fake theorem's proof: `intro n` then `simp`; `bad` errors, `slow` times out, `boom` crashes.
class FakeDojo:
    opened: list[tuple[str, str, str, str, int]] = []

    def __init__(self, theorem, timeout: int = 600) -> None:
        self.theorem = theorem
        FakeDojo.opened.append((theorem.repo.url, theorem.repo.commit, theorem.file_path, theorem.full_name, timeout))

    def __enter__(self):
        return self, TacticState("⊢ ∀ (n : ℕ), n + 0 = n", 0)

    def __exit__(self, *exc) -> None:
        return None

    def run_tac(self, state: TacticState, tactic: str):
        if tactic == "sorry":
            return ProofGivenUp()
        if tactic == "slow":
            raise DojoTacticTimeoutError("tactic timed out")
        if tactic == "boom":
            raise DojoCrashError("Lean died")
        if state.id == 0 and tactic == "intro n":
            return TacticState("n : ℕ\n⊢ n + 0 = n", 1)
        if state.id == 1 and tactic == "simp":
            return ProofFinished(2)
        return LeanError(f"tactic '{tactic}' failed")


@pytest.fixture
def fake_lean_dojo(monkeypatch):
    mod = types.ModuleType("lean_dojo")
    mod.__version__ = "fake"
    mod.LeanGitRepo = lambda url, commit: types.SimpleNamespace(url=url, commit=commit)
    mod.Theorem = lambda repo, file_path, full_name: types.SimpleNamespace(repo=repo, file_path=file_path,
                                                                           full_name=full_name)
    mod.Dojo = FakeDojo
    for cls in (TacticState, ProofFinished, LeanError, ProofGivenUp, DojoTacticTimeoutError, DojoCrashError):
        setattr(mod, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "lean_dojo", mod)
    FakeDojo.opened = []
    return mod


def item(*tactics: str) -> LeanDojoItem:
    return LeanDojoItem("Mathlib/X.lean", "Nat.add_zero'", tactics)


def test_adapter_maps_every_dojo_result_to_verdicts(fake_lean_dojo) -> None:
    cfg = LeanDojoConfig(repo_url="https://github.com/leanprover-community/mathlib4", commit="abc1234", timeout_s=77)
    v = LeanDojoVerifier(cfg)
    batch = [item("intro n", "simp"), item("intro n", "ring"), item("intro n", "sorry"), item("intro n"),
             item("intro n", "slow"), item("boom"), item("intro n", "simp", "rfl")]
    outcomes = asyncio.run(v.check(batch))
    verdicts = asyncio.run(v.verify(batch[:1]))
    assert [o.status for o in outcomes] == [Status.VALID, Status.INVALID, Status.INVALID, Status.INVALID,
                                            Status.TIMEOUT, Status.ERROR, Status.INVALID]
    assert first_error(outcomes[1]).line == 2  # the failing tactic's step
    assert first_error(outcomes[2]).line == 2  # a sorry is a located problem too
    assert first_error(outcomes[3]) is None and outcomes[3].errors[0].data.startswith("unsolved goals")
    assert "DojoCrashError" in outcomes[5].error
    assert first_error(outcomes[6]).line == 3  # a tactic after the proof finished
    assert verdicts[0].verifier == "lean-leandojo" and verdicts[0].version == "lean_dojo-fake"
    assert FakeDojo.opened[0] == ("https://github.com/leanprover-community/mathlib4", "abc1234", "Mathlib/X.lean",
                                  "Nat.add_zero'", 77)


def test_missing_leandojo_is_a_config_error_that_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lean_dojo", None)  # import fails, as where it is not installed
    with pytest.raises(ConfigError, match=r"stepforge\[leandojo\]"):
        LeanDojoVerifier(LeanDojoConfig(repo_url="u", commit="abcdef0"))


def test_lean_backend_registry_names_are_the_config_kinds(fake_lean_dojo) -> None:
    from verifiers.lean import BACKENDS, make_lean_verifier

    for name, backend in BACKENDS.items():
        assert backend.config.model_fields["kind"].default == name
    v = make_lean_verifier(LeanDojoConfig(repo_url="u", commit="abcdef0"))
    assert isinstance(v, LeanDojoVerifier) and not BACKENDS["leandojo"].checks_code
    assert BACKENDS["repl"].tactic_mode and not BACKENDS["kimina"].tactic_mode
