"""`/readyz/live`'s answer from the live driver: free slots counted from admission, and draining."""

import asyncio

import pytest

from api.capacity import capacity
from api.live_driver import LiveDriver
from moshi_core.engines.live import LiveEngine
from moshi_core.errors import LiveBusyError


@pytest.fixture(scope="module")
def models(tiny_models):
    return tiny_models


def test_slots_count_from_admission_and_a_draining_driver_refuses_newcomers_only(models):
    driver = LiveDriver(lambda: LiveEngine(models, slots=2))

    async def main():
        assert capacity(driver) == (200, {"free": None, "slots": None, "active": 0, "draining": False})
        first = await driver.open()  # no audio yet: it holds its slot all the same
        assert capacity(driver) == (200, {"free": 1, "slots": 2, "active": 1, "draining": False})
        second = await driver.open()
        assert capacity(driver) == (503, {"free": 0, "slots": 2, "active": 2, "draining": False})
        await driver.close(second)
        assert capacity(driver)[0] == 200

        driver.drain()
        assert capacity(driver) == (503, {"free": 1, "slots": 2, "active": 1, "draining": True})
        with pytest.raises(LiveBusyError, match="draining"):
            await driver.open()
        assert [s.slot for s in driver.sessions] == [first.slot]  # the conversation in progress stays
        await driver.close(first)
        assert capacity(driver) == (503, {"free": 2, "slots": 2, "active": 0, "draining": True})

    asyncio.run(main())
