"""threaded_stream: a blocking iterator consumed from asyncio without holding any of the loop's threads."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from rwkv_chat.app.threaded_stream import threaded

marker = contextvars.ContextVar("marker", default=None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


async def collect(factory, consume_delay: float = 0.0) -> list:
    items = []
    async for item in threaded(factory):
        items.append(item)
        if consume_delay:
            await asyncio.sleep(consume_delay)
    return items


def test_items_arrive_in_order_produced_in_another_thread_with_the_callers_context():
    seen, taken = {}, threading.Semaphore(0)

    def produce():
        seen["thread"] = threading.current_thread()
        seen["marker"] = marker.get()
        for i in range(5):
            yield i
            taken.acquire()  # a consumer that keeps up: nothing is replaced

    async def main():
        marker.set("event 7")
        items = []
        async for item in threaded(produce):
            items.append(item)
            taken.release()
        return items

    assert run(main()) == [0, 1, 2, 3, 4]
    assert seen["thread"] is not threading.main_thread()
    assert seen["marker"] == "event 7"


def test_a_slow_consumer_gets_the_first_and_the_newest_items_and_always_the_last():
    release = threading.Event()

    def produce():
        yield "first"
        release.wait()  # the consumer is now busy with "first"
        for i in range(100):
            yield i
        yield "last"

    async def main():
        items = []
        async for item in threaded(produce):
            items.append(item)
            if item == "first":
                release.set()
                await asyncio.sleep(0.3)  # behind: the producer finishes meanwhile
        return items

    items = run(main())
    assert items == ["first", "last"]


def test_many_streams_wait_at_once_without_a_thread_pool():
    """200 streams that each wait for a shared event: all of them start (a pool of 40 threads could not)."""
    started, go = [], threading.Event()
    lock = threading.Lock()

    def produce(i):
        with lock:
            started.append(i)
        go.wait()
        yield i

    async def main():
        tasks = [asyncio.create_task(collect(lambda i=i: produce(i))) for i in range(200)]
        deadline = time.monotonic() + 20
        while len(started) < 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        count = len(started)
        go.set()
        results = await asyncio.gather(*tasks)
        return count, results

    count, results = run(main())
    assert count == 200
    assert sorted(r[0] for r in results) == list(range(200))


def test_an_error_reaches_the_consumer_after_the_items_before_it():
    class Refused(ValueError):
        pass

    error = Refused("no")

    def produce():
        yield 1
        raise error

    async def main():
        items = []
        with pytest.raises(Refused) as raised:
            async for item in threaded(produce):
                items.append(item)
        return items, raised.value

    items, raised = run(main())
    assert items == [1] and raised is error


def test_an_error_in_the_factory_reaches_the_consumer():
    def factory():
        raise LookupError("nothing to stream")

    async def main():
        with pytest.raises(LookupError, match="nothing to stream"):
            await collect(factory)

    run(main())


def test_a_consumer_that_leaves_closes_the_iterator_in_its_thread():
    closed, produced = threading.Event(), []

    def produce():
        try:
            for i in range(10_000):
                produced.append(i)
                time.sleep(0.002)
                yield i
        finally:
            closed.set()

    async def main():
        stream = threaded(produce)
        async for item in stream:
            if item >= 3:
                break
        await stream.aclose()

    run(main())
    assert closed.wait(5)
    assert len(produced) < 10_000


def test_a_cancelled_consumer_closes_the_iterator():
    closed = threading.Event()

    def produce():
        try:
            while True:
                time.sleep(0.01)
                yield 0
        finally:
            closed.set()

    async def main():
        task = asyncio.create_task(collect(produce))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert closed.wait(5)
