"""ForwardBatcher's scheduling: who leaves together, with the node proxy's "more coming" hint.

``send`` is the batcher's own injected dependency (the HTTP transport in production);
here it records the batches it is given and answers each row with its input, so the
grouping and the split back to callers are checked exactly. The real path is tested
against TorchServe in tests/integration/test_node_proxy.py.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import numpy as np

from bray.bridge.batching import ForwardBatcher


def _batcher(more_coming: Callable[[], bool] | None, *, max_inflight: int = 2,
             max_wait_s: float = 0.05, wire_turns: int = 1) -> tuple[ForwardBatcher, list[int]]:
    """A batcher whose requests are on the wire for ``wire_turns`` turns of the event loop."""
    sizes: list[int] = []

    async def send(payload: Any) -> tuple[Any, int]:
        sizes.append(len(payload["args"][0]))
        for _ in range(wire_turns):
            await asyncio.sleep(0)
        return {"out": payload["args"][0] * 2}, 7

    return ForwardBatcher(send, max_batch_samples=64, max_inflight=max_inflight, more_coming=more_coming,
                          max_wait_s=max_wait_s), sizes


def _row(i: int) -> dict[str, Any]:
    return {"args": [np.full((1, 3), i, np.float32)]}


def test_a_lone_caller_leaves_at_once_and_gets_its_rows() -> None:
    async def main() -> None:
        batcher, sizes = _batcher(lambda: False)
        out, step = await batcher.submit(_row(5), 1)
        np.testing.assert_array_equal(out["out"], np.full((1, 3), 10, np.float32))
        assert step == 7 and sizes == [1]

    asyncio.run(main())


def test_callers_expected_back_are_waited_for_even_with_nothing_on_the_wire() -> None:
    async def main() -> None:
        expected = 4
        arrived: list[int] = []
        batcher, sizes = _batcher(lambda: len(arrived) < expected, max_wait_s=30.0)

        async def caller(i: int) -> Any:
            arrived.append(i)
            return await batcher.submit(_row(i), 1)

        # The callers arrive one by one, each after the loop ran: without the wait, the first
        # would leave alone (nothing is on the wire) and the rest would follow in a second request.
        results = []
        for i in range(expected):
            results.append(asyncio.ensure_future(caller(i)))
            await asyncio.sleep(0)
        done = await asyncio.wait_for(asyncio.gather(*results), timeout=20)
        assert sizes == [expected]
        for i, (out, step) in enumerate(done):
            np.testing.assert_array_equal(out["out"], np.full((1, 3), 2 * i, np.float32))

    asyncio.run(main())


def test_the_wait_is_bounded_when_the_expected_callers_never_come() -> None:
    async def main() -> None:
        batcher, sizes = _batcher(lambda: True, max_wait_s=0.01)
        out, _ = await asyncio.wait_for(batcher.submit(_row(3), 1), timeout=20)
        np.testing.assert_array_equal(out["out"], np.full((1, 3), 6, np.float32))
        assert sizes == [1]

    asyncio.run(main())


def test_without_a_hint_calls_never_wait() -> None:
    async def main() -> None:
        # A lone call is sent from its caller's own coroutine, in the turn it is made: the
        # others must come while it is still on the wire.
        batcher, sizes = _batcher(None, max_inflight=1, wire_turns=3)
        first = asyncio.ensure_future(batcher.submit(_row(1), 1))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(batcher.submit(_row(i), 1)) for i in (2, 3)]
        await asyncio.wait_for(asyncio.gather(first, *rest), timeout=20)
        # The first left alone at once; the two that came while it was on the wire left together.
        assert sizes == [1, 2]

    asyncio.run(main())


def test_a_request_that_left_early_does_not_leave_the_next_one_without_a_bound() -> None:
    async def main() -> None:
        coming = [True]
        batcher, sizes = _batcher(lambda: coming[0], max_wait_s=0.05)
        first = asyncio.ensure_future(batcher.submit(_row(1), 1))
        await asyncio.sleep(0)  # it waits for the callers said to be coming (a timer is set)
        coming[0] = False
        second = asyncio.ensure_future(batcher.submit(_row(2), 1))  # the last one: both leave now
        await asyncio.wait_for(asyncio.gather(first, second), timeout=20)
        coming[0] = True  # the next request waits again, on a timer of its own, and still leaves
        out, _ = await asyncio.wait_for(batcher.submit(_row(3), 1), timeout=20)
        np.testing.assert_array_equal(out["out"], np.full((1, 3), 6, np.float32))
        assert sizes == [2, 1]

    asyncio.run(main())


def test_calls_of_several_weight_sets_leave_in_one_request_in_segments_each_with_its_step() -> None:
    """The node proxy's league round: tagged calls share a request, one segment per tag, rows in tag order."""
    sent: list[list[tuple[Any, int]]] = []

    async def send(payload: Any) -> tuple[Any, int]:  # a request of untagged calls only
        sent.append([(None, len(payload["args"][0]))])
        return {"out": payload["args"][0] * 2}, 1

    async def send_tagged(payload: Any, segments: list[tuple[Any, int]]) -> tuple[Any, list[int]]:
        sent.append(segments)
        await asyncio.sleep(0)
        return {"out": payload["args"][0] * 2}, [{None: 1, "a": 20, "b": 300}[tag] for tag, _ in segments]

    async def main() -> None:
        batcher = ForwardBatcher(send, max_batch_samples=64, max_inflight=1, send_tagged=send_tagged)
        tags = [None, "a", "b", "a", None, "b", "a"]
        first = batcher.enqueue(_row(99), 1, None)  # goes alone: the rest wait for its slot
        futures = [batcher.enqueue(_row(i), 1, tag) for i, tag in enumerate(tags)]
        await first
        answers = await asyncio.gather(*futures)
        for i, (tag, (out, step)) in enumerate(zip(tags, answers)):
            np.testing.assert_array_equal(out["out"], np.full((1, 3), 2 * i, np.float32))
            assert step == {None: 1, "a": 20, "b": 300}[tag]
        assert sent == [[(None, 1)], [(None, 2), ("a", 3), ("b", 2)]]
        assert batcher.mixed == 1 and batcher.requests_sent == 2

    asyncio.run(main())


def test_a_refused_request_in_segments_is_sent_again_call_by_call() -> None:
    """A segment that fails (424: its weight set is unknown) fails its own callers only."""
    from bray.errors import InputError

    async def send(payload: Any) -> tuple[Any, int]:  # a request of untagged calls only
        return {"out": payload["args"][0]}, 5

    async def send_tagged(payload: Any, segments: list[tuple[Any, int]]) -> tuple[Any, list[int]]:
        if any(tag == "gone" for tag, _ in segments):
            raise InputError("no weight set 'gone'", status=424 if len(segments) > 1 else 404)
        return {"out": payload["args"][0]}, [5] * len(segments)

    async def main() -> None:
        batcher = ForwardBatcher(send, max_batch_samples=64, max_inflight=1, send_tagged=send_tagged)
        first = batcher.enqueue(_row(0), 1, None)
        rest = [batcher.enqueue(_row(i), 1, tag) for i, tag in enumerate(["a", "gone", None], 1)]
        await first
        got = await asyncio.gather(*rest, return_exceptions=True)
        assert isinstance(got[1], InputError) and "gone" in str(got[1])
        assert [g[1] for g in (got[0], got[2])] == [5, 5]  # type: ignore[index]
        assert batcher.splits == 1

    asyncio.run(main())
