"""python hl7's asyncio MLLP server (hl7.mllp.start_hl7_server): answers each message with
the library's own ACK (AA), on persistent connections, in order.

usage: python hl7_asyncio_server.py [PORT] -> prints "listening on PORT" once bound (the
given port, or one chosen by the system), then serves on 127.0.0.1 until killed.
"""
import asyncio
import sys

import hl7
from hl7.mllp import start_hl7_server


async def process(reader, writer):
    try:
        while not writer.is_closing():
            message = await reader.readmessage()
            writer.writemessage(message.create_ack())
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


async def main():
    server = await start_hl7_server(
        process, host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 0
    )
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
