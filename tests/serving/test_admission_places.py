"""LimitsMiddleware's places, in this process: the counts and the waiting set after requests that wait, are
woken, time out or are cancelled, and the bound on how many may wait."""
import asyncio

from pneumonia_cnn.serving.limits import LimitsMiddleware


def middleware(app, wait: float, places: int = 1) -> LimitsMiddleware:
    return LimitsMiddleware(app, body_limit=lambda path: 1 << 20, body_timeout=30, max_in_flight=places,
                            batch_paths=("/predict/batch",), max_batches_in_flight=places, admission_wait=wait)


async def call(limits: LimitsMiddleware, path: str = "/predict") -> int:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b"", "root_path": ""}
    await limits(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def answering_when(gate: asyncio.Event):
    async def app(scope, receive, send):
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
    return app


def test_waiters_are_woken_in_turn_and_leave_no_count_behind():
    async def scenario():
        gate = asyncio.Event()
        limits = middleware(answering_when(gate), wait=5, places=2)
        calls = [asyncio.create_task(call(limits)) for _ in range(4)]  # two admitted, two waiting
        await asyncio.sleep(0.05)
        assert (limits.in_flight, len(limits.waiting)) == (2, 2)
        gate.set()
        statuses = await asyncio.gather(*calls)
        return statuses, limits
    statuses, limits = asyncio.run(scenario())
    assert statuses == [200, 200, 200, 200]
    assert (limits.in_flight, limits.batches, len(limits.waiting)) == (0, 0, 0)


def test_no_more_wait_than_there_are_places_and_a_wait_ends_in_503():
    async def scenario():
        gate = asyncio.Event()
        limits = middleware(answering_when(gate), wait=1.5, places=2)
        held = [asyncio.create_task(call(limits)) for _ in range(2)]
        waiting = [asyncio.create_task(call(limits)) for _ in range(2)]
        await asyncio.sleep(0.05)
        start = asyncio.get_running_loop().time()
        beyond = await call(limits)  # two wait already: refused at once, not after the 1.5 s wait
        seconds = asyncio.get_running_loop().time() - start
        timed_out = await asyncio.gather(*waiting)
        gate.set()
        return beyond, seconds, timed_out, await asyncio.gather(*held), limits
    beyond, seconds, timed_out, held, limits = asyncio.run(scenario())
    assert beyond == 503 and seconds < 0.75 and timed_out == [503, 503] and held == [200, 200]
    assert (limits.in_flight, len(limits.waiting)) == (0, 0)


def test_a_waiter_cancelled_while_it_waits_takes_no_place():
    async def scenario():
        gate = asyncio.Event()
        limits = middleware(answering_when(gate), wait=5, places=1)
        held = asyncio.create_task(call(limits))
        waiter = asyncio.create_task(call(limits))
        await asyncio.sleep(0.05)
        waiter.cancel()  # the client left while it waited
        await asyncio.sleep(0.05)
        counts = (limits.in_flight, len(limits.waiting))
        gate.set()
        await held
        return counts, limits
    counts, limits = asyncio.run(scenario())
    assert counts == (1, 0) and (limits.in_flight, len(limits.waiting)) == (0, 0)
