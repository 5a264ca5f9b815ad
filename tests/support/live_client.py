"""What the live websocket tests read from `/api/chat` as a client."""

import asyncio

import websockets


async def last_message_before_close(ws) -> tuple[bytes | str | None, int | None]:
    """The last message before the server closes the socket (within 10 s), and its close code."""
    last = None
    try:
        async with asyncio.timeout(10):
            while True:
                last = await ws.recv()
    except websockets.ConnectionClosed:
        pass
    return last, ws.close_code
