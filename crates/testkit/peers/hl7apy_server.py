"""hl7apy's MLLP server (hl7apy.mllp.MLLPServer), which closes the connection after each
reply: the peer for the client's reconnect path.

usage: python hl7apy_server.py  -> prints "listening on PORT" once bound (port chosen by
the system), then serves on 127.0.0.1 until killed. ADT^A01 messages get AA; any other
type, or a message hl7apy cannot read, gets AR from the error handler.
"""
from datetime import datetime, timezone

from hl7apy.mllp import AbstractErrorHandler, AbstractHandler, MLLPServer
from hl7apy.parser import parse_message


def ack(code, control_id):
    now = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    text = (
        f"MSH|^~\\&|HL7APY|TEST|||{now}||ACK^A01^ACK|A{control_id}|P|2.5\r"
        f"MSA|{code}|{control_id}\r"
    )
    # hl7apy writes the reply as is: it must be framed here.
    return "\x0b" + text + "\x1c\r"


class Accept(AbstractHandler):
    def reply(self):
        msg = parse_message(self.incoming_message, find_groups=False)
        return ack("AA", msg.msh.msh_10.value)


class Refuse(AbstractErrorHandler):
    def reply(self):
        control_id = ""
        try:
            control_id = parse_message(self.incoming_message, find_groups=False).msh.msh_10.value
        except Exception:
            pass
        return ack("AR", control_id)


server = MLLPServer(
    "127.0.0.1",
    0,
    {"ADT^A01^ADT_A01": (Accept,), "ADT^A01": (Accept,), "ERR": (Refuse,)},
)
print(f"listening on {server.server_address[1]}", flush=True)
server.serve_forever()
