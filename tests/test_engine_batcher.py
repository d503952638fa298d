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


def test_submit_many_answers_in_order_across_chunks_and_shares_flushes_with_submit():
    calls: list[list[int]] = []

    async def fn(items: list[int]) -> list[int]:
        calls.append(list(items))
        for _ in range(len(items)):  # chunks finish in another order than they were sent
            await asyncio.sleep(0)
        return [i * 10 for i in items]

    async def main():
        batcher: Batcher[int, int] = Batcher(fn, max_batch=3)
        many, one, empty = await asyncio.gather(batcher.submit_many(list(range(7))), batcher.submit(100),
                                                batcher.submit_many([]))
        return many, one, empty

    many, one, empty = asyncio.run(main())
    assert many == [i * 10 for i in range(7)] and one == 1000 and empty == []
    assert sorted(x for c in calls for x in c) == [*range(7), 100]  # one flush, cut by max_batch
    assert max(len(c) for c in calls) == 3 and len(calls) == 3


def test_submit_many_fails_its_whole_group_when_one_chunk_fails_and_no_waiter_hangs():
    async def fn(items: list[int]) -> list[int]:
        if 4 in items:
            raise RuntimeError("chunk with 4 failed")
        await asyncio.sleep(0)
        return items

    async def main():
        batcher: Batcher[int, int] = Batcher(fn, max_batch=2)
        return await asyncio.wait_for(asyncio.gather(batcher.submit_many([1, 2, 3, 4, 5]), batcher.submit(9),
                                                     return_exceptions=True), timeout=10)

    group, alone = asyncio.run(main())
    assert isinstance(group, RuntimeError) and "chunk with 4" in str(group) and alone == 9
