"""alephvm's event wrapper: the ASGI app uvicorn runs for a program that
subscribes to messages (on.message). It serves the program's own app
unchanged and, on a unix socket only the init and the workload's user can
reach, calls it with the reference's event scope for each message the node
delivers: {"type": "aleph.message"}, and receive() gives
{"type": "aleph.message", "body": <the message's JSON>, "more_body": False}.
Events never travel on port 8080: nobody behind the node's proxy can make
one."""

import asyncio
import importlib
import os
import struct

_SPEC = os.environ.get("ALEPHVM_ASGI_APP", "main:app")
_module, _, _attr = _SPEC.partition(":")
_app = getattr(importlib.import_module(_module), _attr or "app")
_SOCKET = os.environ.get("ALEPHVM_EVENTS_SOCKET", "/run/alephvm-events/events.sock")
_MAX = 2 << 20
_server = None


async def _event(reader, writer):
    try:
        (size,) = struct.unpack(">I", await reader.readexactly(4))
        if size > _MAX:
            raise ValueError("event of %d bytes" % size)
        body = (await reader.readexactly(size)).decode()

        async def receive():
            return {"type": "aleph.message", "body": body, "more_body": False}

        async def send(_message):
            pass

        await _app({"type": "aleph.message"}, receive, send)
        writer.write(b"ok\n")
    except Exception as error:  # noqa: BLE001 - the error is the answer
        writer.write(("error: %s: %s\n" % (type(error).__name__, error)).encode()[:4096])
    try:
        await writer.drain()
    finally:
        writer.close()


async def _serve():
    global _server
    if _server is None:
        if os.path.exists(_SOCKET):
            os.unlink(_SOCKET)
        _server = await asyncio.start_unix_server(_event, path=_SOCKET)
        os.chmod(_SOCKET, 0o600)


async def app(scope, receive, send):
    await _serve()
    await _app(scope, receive, send)
