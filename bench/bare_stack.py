"""The limit of our stack: a bare uvicorn + wsproto ASGI app that only pushes frames.

    python bench/bare_stack.py PORT

A client sends "COUNT SIZE"; the app answers with COUNT text frames of SIZE
bytes as fast as uvicorn lets it, then one "end" frame.  bench/push.py runs
the same number and size of frames through Mini Agent Web beside this.
"""
import sys

import uvicorn


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "websocket":
        return
    await receive()                                   # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        count, size = map(int, message["text"].split())
        frame = '{"seq":1,"type":"delta","content":"' + "x" * max(0, size - 40) + '"}'
        for _ in range(count):
            await send({"type": "websocket.send", "text": frame})
        await send({"type": "websocket.send", "text": "end"})


if __name__ == "__main__":
    print("ready", flush=True)
    # The same WebSocket settings as `python agent_web.py`: no per-message deflate.
    deflate = len(sys.argv) > 2 and sys.argv[2] == "deflate"
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), ws="wsproto", log_level="warning",
                ws_per_message_deflate=deflate)
