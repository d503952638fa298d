"""MUSTARD-style loop: pass rate, author requests and Lean checks by the number of revisions R, on the shipped
concepts with the simulated author, checked by the stand-in Lean REPL (not Lean) over its real stdio protocol.

    .venv/bin/python benchmarks/mustard_revisions.py [--samples 4] [--mistake-rate 0.2] [--fix-rate 0.8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.mustard.concepts import expand_seeds, load_concepts  # noqa: E402
from tasks.mustard.pipeline import LoopSettings, merge_stats, run_mustard, stats  # noqa: E402
from tasks.policy.simulated_author import SimulatedAuthor, SimulatedAuthorConfig  # noqa: E402
from tasks.prompt import load_template  # noqa: E402
from verifiers.lean.repl import LeanReplConfig, LeanReplVerifier  # noqa: E402


async def one(r: int, samples: int, mistake: float, fix: float) -> tuple[dict, float]:
    seeds = expand_seeds(load_concepts(), samples)
    checker = LeanReplVerifier(LeanReplConfig(command=[sys.executable, "-m", "verifiers.lean.testing.repl_server"],
                                              max_repls=2, max_repl_mem_mb=None))
    author = SimulatedAuthor(SimulatedAuthorConfig(mistake_rate=mistake, fix_rate=fix))
    settings = LoopSettings(r, 0.7, 2048, "import Mathlib", 0, load_template("mustard-author"),
                            load_template("mustard-revise"))
    t0 = time.perf_counter()
    try:
        results = await run_mustard(seeds, author, checker, settings)
    finally:
        await checker.aclose()
    return merge_stats([stats(results)]), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--mistake-rate", type=float, default=0.2)
    p.add_argument("--fix-rate", type=float, default=0.8)
    p.add_argument("--max-r", type=int, default=3)
    a = p.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f}; mistake_rate {a.mistake_rate}, fix_rate {a.fix_rate}, "
          f"{a.samples} samples per concept")
    print("| R | seeds | passed | pass rate | passed after 0/1/2/3 revisions | author requests | Lean checks | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in range(a.max_r + 1):
        s, secs = asyncio.run(one(r, a.samples, a.mistake_rate, a.fix_rate))
        after = "/".join(str(s["passed_after_revisions"].get(str(k), 0)) for k in range(4))
        print(f"| {r} | {s['seeds']} | {s['passed']} | {s['pass_rate']:.3f} | {after} | {s['author_requests']} | "
              f"{s['lean_checks']} | {secs:.2f} |")
    print(f"\ncommand: .venv/bin/python benchmarks/mustard_revisions.py --samples {a.samples} --mistake-rate "
          f"{a.mistake_rate} --fix-rate {a.fix_rate} --max-r {a.max_r}")


if __name__ == "__main__":
    main()
