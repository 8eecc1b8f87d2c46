"""The pacer lets a few slices of work run per turn of the event loop"""

import asyncio
import collections

from jupyterhub_outpost.pacing import Pacer

from .utils import database_independent

pytestmark = database_independent


async def test_a_burst_runs_a_few_per_turn_in_arrival_order():
    loop = asyncio.get_running_loop()
    turn = 0
    ticking = True

    def tick():
        nonlocal turn
        turn += 1
        if ticking:
            loop.call_soon(tick)

    tick()
    pacer = Pacer(per_turn=3)
    granted = []

    async def worker(i):
        await pacer.wait()
        granted.append((i, turn))

    await asyncio.gather(*(worker(i) for i in range(20)))
    ticking = False
    assert [i for i, _ in granted] == list(range(20))
    per_turn = collections.Counter(t for _, t in granted)
    assert max(per_turn.values()) <= 3
    assert len(per_turn) >= 7  # 20 slices, at most 3 a turn


async def test_a_lone_caller_does_not_wait():
    pacer = Pacer(per_turn=2)
    await asyncio.wait_for(pacer.wait(), 0.1)
