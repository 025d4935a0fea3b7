// Sends messages to an MLLP receiver with @medplum/hl7's Hl7Client, one connection,
// waiting for each ACK (sendAndWait), and prints one JSON line per ACK.
//
// usage: node medplum_send.mjs HOST PORT COUNT
// Message i (1-based) has control id MED<i>; every fifth one lacks MSH-9 (malformed).
import { Hl7Client } from '@medplum/hl7';
import { Hl7Message } from '@medplum/core';

const [host, port, count] = process.argv.slice(2);
const client = new Hl7Client({ host, port: Number(port), keepAlive: true });
try {
  for (let i = 1; i <= Number(count); i++) {
    const id = `MED${i}`;
    const type = i % 5 === 0 ? '' : 'ADT^A01^ADT_A01';
    const text =
      `MSH|^~\\&|MEDPLUM|LAB|PASSERELLE|HOSP|20240101120000||${type}|${id}|P|2.5\r` +
      `EVN|A01|20240101120000\rPID|1||${i}^^^HOSP^PI||DOE^JANE\r`;
    const ack = await client.sendAndWait(Hl7Message.parse(text));
    const msa = ack.getSegment('MSA');
    console.log(JSON.stringify({ sent: id, code: msa?.getField(1)?.toString(), ack: msa?.getField(2)?.toString() }));
  }
} finally {
  await client.close();
}
