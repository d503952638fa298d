"""A stand-in for `leanprover-community/repl` on stdin/stdout: the same framing, shapes and failure modes.

Not Lean: proofs are decided by the stand-in checker (`checker.py`), which refuses anything outside its
fragment. What it reproduces exactly is the protocol:
- a request is the lines read up to a blank line, each line's trailing whitespace dropped and the lines
  joined without a newline (so a raw newline inside a JSON string silently joins two lines, and a blank
  line inside one cuts the request short); a request that is a lone blank line is unparseable;
- a request that is not JSON, or not a known command, ends the process with `uncaught exception:` on
  stderr, as the REPL's uncaught `IO.userError` does;
- answers are pretty-printed JSON (several lines when long) followed by a blank line; empty fields are
  left out; `proofStatus` only from v4.19; the sorry warning quotes `'sorry'` before v4.28, `` `sorry` ``
  from it.

Fault switches for testing clients: a fixed cost per command and per header (slow imports), hangs,
crashes and memory growth, either always on a marker in the command text (`-- standin:hang`,
`-- standin:crash`, `-- standin:grow`, `-- standin:crash-once:PATH`, which crashes only while PATH does
not exist and creates it) or at a random rate. Run it as
`python -m verifiers.lean.testing.repl_server --version 4.19` or `stepforge serve-lean --protocol repl`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, BinaryIO

from verifiers.lean.testing.engine import StandinLean


@dataclass
class ReplFaults:
    version: str = "4.19"
    cost_ms: float = 0.0  # every non-header command takes this long
    header_cost_ms: float = 0.0  # a command with imports takes this long (Mathlib's import is slow)
    hang_rate: float = 0.0
    crash_rate: float = 0.0
    grow_mb: int = 0  # memory kept per command (a REPL's memory grows with its environments)
    seed: int | None = None
    log: str | None = None  # append every request to this file (tests count header runs with it)


def render(obj: Any) -> str:
    """Like Lean's `Json.pretty` at width 80: one line when it fits, several otherwise."""
    compact = json.dumps(obj, ensure_ascii=False)
    if len(compact) <= 80:
        return compact
    return json.dumps(obj, ensure_ascii=False, indent=1)


def read_request(stdin: BinaryIO) -> str:
    """The REPL's `getLines`: lines up to a blank one, trailing whitespace dropped, joined as they are."""
    acc = ""
    while True:
        raw = stdin.readline()
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            return acc + line
        acc += line.rstrip()


class _Hog:
    kept: list[bytearray] = []


def _die(message: str, code: int) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(code)


def random_fault(faults: ReplFaults, text: str, rng: random.Random) -> str | None:
    """"hang", "crash" or None for a command, at the configured rates. With a seed the draw depends only on
    (seed, command text): the same proofs fail the same way in every run, whichever of a pool's processes
    (each with its own pid and request order) gets them, so a test of faults is deterministic; a retried
    command fails again, like a marker. Without a seed: `rng`, fresh per process."""
    if not (faults.hang_rate or faults.crash_rate):
        return None
    draw = rng if faults.seed is None else random.Random(f"stand-in-fault\0{faults.seed}\0{text}")
    if faults.hang_rate and draw.random() < faults.hang_rate:
        return "hang"
    if faults.crash_rate and draw.random() < faults.crash_rate:
        return "crash"
    return None


def serve(faults: ReplFaults, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    lean = StandinLean(faults.version)
    rng = random.Random()  # unseeded faults only
    while True:
        query = read_request(stdin)
        if query == "":
            return 0
        if query.startswith("#") or query.startswith("--"):
            continue
        try:
            obj = json.loads(query)
        except json.JSONDecodeError as exc:
            _die("uncaught exception: " + json.dumps({"message": f"Could not parse JSON:\n{exc}"}), 1)
            return 1
        if not isinstance(obj, dict):
            _die("uncaught exception: " + json.dumps({"message": "Could not parse as a valid JSON command:\n"
                                                      "expected an object"}), 1)
        if faults.log:
            with open(faults.log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"pid": os.getpid(), **obj}, ensure_ascii=False) + "\n")
        text = obj.get("cmd") if isinstance(obj.get("cmd"), str) else obj.get("tactic", "")
        text = text if isinstance(text, str) else ""
        is_header = "cmd" in obj and obj.get("env") is None and "import " in text
        if not is_header:
            fault = random_fault(faults, text, rng)
            if "-- standin:hang" in text or fault == "hang":
                time.sleep(10**6)
            if re.search(r"-- standin:crash\b(?!-)", text) or fault == "crash":
                _die("INTERNAL PANIC: stand-in crash fault", 134)
            once = re.search(r"-- standin:crash-once:(\S+)", text)
            if once and not os.path.exists(once.group(1)):
                open(once.group(1), "w").close()
                _die("INTERNAL PANIC: stand-in crash fault (once)", 134)
        if faults.grow_mb or "-- standin:grow" in text:
            try:
                block = bytearray(max(faults.grow_mb, 64) * 2**20)
                block[::4096] = b"\x01" * len(block[::4096])  # touch the pages: resident, not just reserved
                _Hog.kept.append(block)
            except MemoryError:
                _die("INTERNAL PANIC: out of memory", 1)
        delay = faults.header_cost_ms if is_header else faults.cost_ms
        if delay:
            time.sleep(delay / 1000)
        if isinstance(obj.get("proofState"), int) and isinstance(obj.get("tactic"), str):
            answer = lean.tactic(obj["tactic"], obj["proofState"])
        elif any(k in obj for k in ("pickleTo", "unpickleEnvFrom", "unpickleProofStateFrom")):
            answer = {"message": "stand-in: pickling is outside the stand-in's fragment; it is not Lean"}
        elif isinstance(obj.get("cmd"), str) and (obj.get("env") is None or isinstance(obj.get("env"), int)):
            answer = lean.command(obj["cmd"], obj.get("env"))
        elif isinstance(obj.get("path"), str):
            try:
                with open(obj["path"], encoding="utf-8") as fh:
                    answer = lean.command(fh.read(), obj.get("env"))
            except OSError as exc:
                _die(f"uncaught exception: no such file or directory (error code: 2)\n  file: {obj['path']} "
                     f"({exc.strerror})", 1)
                return 1
        else:
            _die("uncaught exception: " + json.dumps({"message": "Could not parse as a valid JSON command:\n"
                                                      "no field `cmd`, `tactic` or `path`"}), 1)
            return 1
        stdout.write((render(answer) + "\n\n").encode("utf-8"))
        stdout.flush()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", default="4.19", help="Lean REPL version to imitate (4.18: no proofStatus; "
                   "4.28: sorry warning quoted with backticks).")
    p.add_argument("--cost-ms", type=float, default=0.0, help="Milliseconds every command takes.")
    p.add_argument("--header-cost-ms", type=float, default=0.0, help="Milliseconds a command with imports takes.")
    p.add_argument("--hang-rate", type=float, default=0.0, help="Share of commands that never answer.")
    p.add_argument("--crash-rate", type=float, default=0.0, help="Share of commands that kill the process.")
    p.add_argument("--grow-mb", type=int, default=0, help="MiB of memory kept after every command.")
    p.add_argument("--seed", type=int, default=None, help="Seed of the random faults: with it, whether a command hangs or crashes depends only "
                   "on the seed and the command's text.")
    p.add_argument("--log", default=None, help="Append every request (with the pid) to this file.")


def faults_from_args(ns: argparse.Namespace) -> ReplFaults:
    return ReplFaults(version=ns.version, cost_ms=ns.cost_ms, header_cost_ms=ns.header_cost_ms,
                      hang_rate=ns.hang_rate, crash_rate=ns.crash_rate, grow_mb=ns.grow_mb, seed=ns.seed, log=ns.log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Stand-in for the Lean REPL (not Lean: a checker of a fragment).")
    add_arguments(p)
    return serve(faults_from_args(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
