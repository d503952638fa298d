"""Code step check (rStar-Math's code-augmented steps): run the Python a step carries, in a sandbox.

A step carries code in a fenced block (```` ```python ... ``` ````) or between configurable inline
markers (default `<code>...</code>`, so a one-line step can hold `print(12 * 4)`). The code runs in a
fresh interpreter (`python -I -S`: no user site, no environment variables, no `site`), in a new process
group inside an empty temporary directory, under:

- `RLIMIT_CPU` and `RLIMIT_AS` (CPU seconds, address space), `RLIMIT_FSIZE = 0` (no file grows);
- an audit hook installed before the step's code runs that refuses sockets (no network), process
  creation (`subprocess`, `os.system`, `exec*`, `fork`, `posix_spawn`), `ctypes`, and opening files for
  writing; audit hooks cannot be removed once added;
- a wall-clock timeout after which the whole process group is killed.

Outcomes: no code in the step -> `none`; the code raises -> `invalid`; over the wall or CPU limit ->
`timeout`; the sandbox refused something (network, a process) -> `error` (the step's arithmetic was not
judged); the code ran and the last number it printed contradicts the value the step claims (the number
after the last `=` of the step's prose, else after "answer is") -> `invalid`; otherwise `valid`.

The sandbox is a guard against accidents and the common escapes, not a security boundary for hostile
code: run untrusted policies' code in a container as well (see infra/).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from verifiers.base import Status, StepItem, Verdict

NAME = "code-check"
_SANDBOX_DENIED = 3  # exit code of the preamble when the audit hook refused an action

# Runs first in the child: limits, the audit hook, then the step's code read from stdin. Kept as plain
# text (it is the child's program), formatted with the limits.
_PREAMBLE = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
_code = sys.stdin.read()
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
            "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg", "os.remove", "os.unlink", "os.rmdir",
            "os.rename", "os.truncate", "shutil.", "os.chmod", "os.chown", "os.symlink", "os.link",
            "os.mkdir", "os.putenv", "os.unsetenv", "webbrowser.", "urllib.", "http.client.", "ftplib.",
            "smtplib.", "resource.setrlimit", "_posixsubprocess.")
_WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | 0o2000  # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND

class SandboxDenied(BaseException):  # not an Exception: a step's `except Exception` cannot swallow it
    pass

def _hook(event, args):
    if event.startswith(_BLOCKED) or (event == "import" and args[0].split(".")[0] in ("ctypes", "_ctypes")):
        raise SandboxDenied(event)
    if event == "open":
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS):
            raise SandboxDenied("open for writing: %r" % (args[0],))

sys.addaudithook(_hook)
del resource
try:
    exec(compile(_code, "<step>", "exec"), {{"__name__": "__main__"}})
except SandboxDenied as exc:
    sys.stdout.flush()
    print("stepforge sandbox refused: %s" % exc, file=sys.stderr)
    sys.exit(%(denied)d)
""".replace("%(denied)d", str(_SANDBOX_DENIED))

_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_CLAIM_EQ_RE = re.compile(r"=\s*\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)")
_CLAIM_ANSWER_RE = re.compile(r"(?i)answer is:?\s*\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")


class CodeCheckConfig(BaseModel):
    """Which steps carry code, and the limits the code runs under."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["code-check"] = "code-check"
    fence_languages: list[str] = Field(default_factory=lambda: ["python", "py"],
                                       description="Languages of fenced blocks that are run (```python).")
    marker_open: str | None = Field("<code>", description="Inline code starts after this marker (None: off).")
    marker_close: str = Field("</code>", description="Inline code ends at this marker.")
    timeout_s: float = Field(5.0, gt=0, le=600, description="Wall-clock limit per step; the process group is "
                             "killed after it.")
    cpu_s: int = Field(2, ge=1, le=600, description="RLIMIT_CPU of the child, seconds.")
    memory_mb: int = Field(512, ge=64, le=65536, description="RLIMIT_AS of the child, MiB.")
    workers: int = Field(4, ge=1, le=256, description="Steps run at once.")
    max_output_chars: int = Field(10_000, ge=100, description="Captured stdout/stderr kept per step.")
    site_packages: bool = Field(False, description="Let the code import installed packages (drops `-S`, keeps "
                                "`-I`); off: the standard library only.")

    @model_validator(mode="after")
    def _markers(self) -> "CodeCheckConfig":
        if self.marker_open is not None and (not self.marker_open or not self.marker_close):
            raise ValueError("`code_check.marker_open` and `marker_close` must be non-empty strings; set "
                             "`marker_open: null` to run fenced blocks only.")
        return self


@dataclass(frozen=True)
class CodeStep:
    code: str  # every code piece of the step, in order, as one program
    prose: str  # the step without its code
    claim: Fraction | None
    claim_decimals: int


def _number(text: str) -> tuple[Fraction, int]:
    digits = text.replace(",", "")
    return Fraction(digits), (len(digits.split(".")[1]) if "." in digits else 0)


def extract(text: str, cfg: CodeCheckConfig) -> CodeStep | None:
    """The step's code, prose and claimed value; None when it carries no code."""
    pieces: list[tuple[int, int, str]] = []
    langs = "|".join(re.escape(lang) for lang in cfg.fence_languages)
    if langs:
        for m in re.finditer(rf"```(?:{langs})[ \t]*\n(.*?)```", text, re.DOTALL):
            pieces.append((m.start(), m.end(), m.group(1)))
    if cfg.marker_open:
        pattern = re.escape(cfg.marker_open) + r"(.*?)" + re.escape(cfg.marker_close)
        for m in re.finditer(pattern, text, re.DOTALL):
            if not any(s <= m.start() < e for s, e, _ in pieces):
                pieces.append((m.start(), m.end(), m.group(1)))
    if not pieces:
        return None
    pieces.sort()
    code = "\n".join(p[2].strip("\n") for p in pieces)
    prose, last = [], 0
    for s, e, _ in pieces:
        prose.append(text[last:s])
        last = e
    prose.append(text[last:])
    plain = " ".join(prose)
    claim, decimals = None, 0
    found = _CLAIM_EQ_RE.findall(plain) or _CLAIM_ANSWER_RE.findall(plain)
    if found:
        claim, decimals = _number(found[-1])
    return CodeStep(code, plain, claim, decimals)


def _agrees(printed: Fraction, claim: Fraction, decimals: int) -> bool:
    if printed == claim:
        return True
    diff = abs(printed - claim)
    if diff <= Fraction(1, 10**9) * max(1, abs(printed)):  # float noise: 14.999999999999998 for 15
        return True
    return decimals > 0 and diff <= Fraction(1, 10**decimals)  # the claim shows a rounded value


def _tail(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-n:]


class CodeCheck:
    """`Verifier` over `StepItem`s: runs each step's code in a sandboxed subprocess."""

    name = NAME

    def __init__(self, config: CodeCheckConfig | None = None) -> None:
        self.config = config or CodeCheckConfig()
        self.version = f"1+py{sys.version_info.major}.{sys.version_info.minor}"
        self._sem: asyncio.Semaphore | None = None
        self._memo: dict[str, Verdict] = {}  # equal steps recur across a tree's paths: run once

    def _verdict(self, status: Status, detail: str) -> Verdict:
        score = {Status.VALID: 1.0, Status.INVALID: 0.0}.get(status)
        return Verdict(self.name, self.version, status, score, detail[:500])

    async def verify(self, batch: Sequence[StepItem]) -> list[Verdict]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.config.workers)
        return list(await asyncio.gather(*(self._one(item.text) for item in batch)))

    async def _one(self, text: str) -> Verdict:
        if text in self._memo:
            return self._memo[text]
        try:
            step = extract(text, self.config)
            if step is None:
                verdict = self._verdict(Status.NONE, "no code in the step")
            else:
                assert self._sem is not None
                async with self._sem:
                    verdict = await self._run(step)
        except Exception as exc:  # never fail a build on one step: it is undecided, and says why
            verdict = self._verdict(Status.ERROR, f"code check failed: {type(exc).__name__}: {exc}")
        self._memo[text] = verdict
        return verdict

    async def _run(self, step: CodeStep) -> Verdict:
        cfg = self.config
        preamble = _PREAMBLE.format(cpu=cfg.cpu_s, mem=cfg.memory_mb * 1024 * 1024)
        flags = ["-I"] if cfg.site_packages else ["-I", "-S"]
        with tempfile.TemporaryDirectory(prefix="stepforge-code-") as cwd:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *flags, "-c", preamble, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd,
                env={"PATH": os.defpath, "LC_ALL": "C.UTF-8"}, start_new_session=True)
            try:
                out, err = await asyncio.wait_for(proc.communicate(step.code.encode()), cfg.timeout_s)
            except asyncio.TimeoutError:
                _kill_group(proc.pid)
                await proc.wait()
                return self._verdict(Status.TIMEOUT, f"over the {cfg.timeout_s:g} s wall limit")
            except BaseException:
                _kill_group(proc.pid)
                raise
            finally:
                _kill_group(proc.pid)  # anything the code left behind in its group goes too
        stdout = out.decode(errors="replace")
        stderr = err.decode(errors="replace")
        rc = proc.returncode
        if rc in (-signal.SIGXCPU, -signal.SIGKILL) or "CPU time limit" in stderr:
            return self._verdict(Status.TIMEOUT, f"over the {cfg.cpu_s} s CPU limit")
        if rc == _SANDBOX_DENIED and "stepforge sandbox refused" in stderr:
            return self._verdict(Status.ERROR, _tail(stderr.strip().splitlines()[-1], 300))
        if rc != 0:
            lines = stderr.strip().splitlines()
            return self._verdict(Status.INVALID, f"raised: {_tail(lines[-1] if lines else f'exit code {rc}', 300)}")
        numbers = _NUMBER_RE.findall(stdout)
        if step.claim is None:
            return self._verdict(Status.VALID, "ran; the step claims no value to compare")
        if not numbers:
            return self._verdict(Status.VALID, f"ran; printed no number to compare with {step.claim}")
        printed, _ = _number(numbers[-1])
        if _agrees(printed, step.claim, step.claim_decimals):
            return self._verdict(Status.VALID, f"printed {numbers[-1]}")
        return self._verdict(Status.INVALID, f"printed {numbers[-1]}, the step claims {_fmt(step.claim)}")

    async def aclose(self) -> None:
        self._memo.clear()


def _fmt(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{float(v):.6g}"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
