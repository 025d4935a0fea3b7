"""python hl7's asyncio MLLP server, answering by control id (MSH-10) for delivery tests:
a control id starting with AE or AR gets that NAK code, one starting with SLOW gets no
answer at all, any other gets AA. Persistent connections, in order.

usage: python hl7_nak_server.py -> prints "listening on PORT" once bound (port chosen by
the system), then serves on 127.0.0.1 until killed.
"""
import asyncio

from hl7.mllp import start_hl7_server


async def process(reader, writer):
    try:
        while not writer.is_closing():
            message = await reader.readmessage()
            control_id = str(message.segment("MSH")(10))
            if control_id.startswith("SLOW"):
                continue
            code = control_id[:2] if control_id[:2] in ("AE", "AR") else "AA"
            writer.writemessage(message.create_ack(ack_code=code))
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


async def main():
    server = await start_hl7_server(process, host="127.0.0.1", port=0)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
