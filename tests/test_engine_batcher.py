"""The scheduler's batcher: a batching backend gets one call per flush; a backend that serves requests
independently (HTTP) gets one call per request, and each answer reaches its tree as soon as it lands."""

from __future__ import annotations

import asyncio

from tasks.search.engine import Batcher


def _run(each: bool) -> tuple[list[list[str]], list[str]]:
    calls: list[list[str]] = []
    resolved: list[str] = []

    async def fn(items: list[str]) -> list[str]:
        calls.append(list(items))
        # "slow" takes many event-loop turns, "fast" one: an HTTP request with a long and a short answer.
        for _ in range(50 if "slow" in items else 1):
            await asyncio.sleep(0)
        return [f"done:{i}" for i in items]

    async def main() -> None:
        batcher: Batcher[str, str] = Batcher(fn, max_batch=16, each=each)

        async def tree(item: str) -> None:
            out = await batcher.submit(item)
            resolved.append(out)

        await asyncio.gather(tree("slow"), tree("fast"))

    asyncio.run(main())
    return calls, resolved


def test_a_batching_backend_gets_the_whole_flush_in_one_call():
    calls, resolved = _run(each=False)
    assert calls == [["slow", "fast"]]
    assert sorted(resolved) == ["done:fast", "done:slow"]


def test_independent_requests_are_routed_as_each_lands():
    calls, resolved = _run(each=True)
    assert sorted(calls) == [["fast"], ["slow"]]
    assert resolved == ["done:fast", "done:slow"], "the fast answer does not wait for the slow one"


def test_a_failed_request_fails_only_its_own_waiter_when_independent():
    async def fn(items: list[str]) -> list[str]:
        if items == ["bad"]:
            raise RuntimeError("server said no")
        return [f"ok:{i}" for i in items]

    async def main():
        batcher: Batcher[str, str] = Batcher(fn, max_batch=16, each=True)
        return await asyncio.gather(batcher.submit("bad"), batcher.submit("good"), return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and str(bad) == "server said no" and good == "ok:good"
