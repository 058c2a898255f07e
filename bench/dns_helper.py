"""A fast, single-threaded DNS responder on 127.0.0.1 for the benchmarks (UDP only).

    python bench/dns_helper.py '{"records": [["name", "TXT", "value"], ...],
                                 "timeouts": [["name", null], ...]}'

Prints its port on the first line, then serves until SIGTERM.

Why not the project's test DNS server (mox_testpeers.dnsserver): it starts a thread per
query and parses every query with dnspython, about 1-2 ms per answer here, which made the SPF
lookup mox does for every incoming message dominate the one-connection benchmark. A real
deployment asks a local caching resolver (unbound, ...) and gets a cache hit in well under
0.2 ms. This responder answers from prebuilt wire-format templates (only the query ID and the
question are copied in), which is closer to that: about 30-60 us per query.

Names with records get them (AA), other types of those names NODATA; names listed in
"timeouts" (and below them) get no answer at all; every other name gets NXDOMAIN.
"""

from __future__ import annotations

import asyncio
import json
import signal
import struct
import sys

import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset


def _qname_end(wire: bytes) -> int:
    """Offset just past the question's QNAME (no compression in queries)."""
    i = 12
    while True:
        n = wire[i]
        if n == 0:
            return i + 1
        i += 1 + n


class Responder(asyncio.DatagramProtocol):
    def __init__(self, records: list[list[str]], timeouts: list[list[str | None]]) -> None:
        self.templates: dict[tuple[bytes, int], bytes] = {}
        byname: dict[tuple[str, str], list[str]] = {}
        for name, rdtype, value in records:
            byname.setdefault((name.lower().rstrip(".") + ".", rdtype.upper()), []).append(value)
        for (name, rdtype), values in byname.items():
            q = dns.message.make_query(name, rdtype, use_edns=False)
            r = dns.message.make_response(q)
            r.flags |= dns.flags.AA
            if rdtype == "TXT":  # strings of at most 255 characters (a DKIM key needs several)
                values = [" ".join('"' + v[i:i + 255].replace('"', '\\"') + '"' for i in range(0, len(v), 255))
                          for v in values]
            r.answer.append(dns.rrset.from_text_list(name, 300, "IN", rdtype, values))
            wire = r.to_wire()
            qend = _qname_end(wire) + 4
            key = (wire[12:qend].lower(), 0)
            self.templates[key] = wire[2:]  # everything after the ID
        self.names = {name for name, _ in byname}
        self.timeouts = {(n.lower().rstrip(".") + ".") for n, _ in timeouts}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        try:
            qend = _qname_end(data) + 4
            question = data[12:qend]
            tpl = self.templates.get((question.lower(), 0))
            if tpl is not None:
                # copy the client's question (0x20 case) into the template
                self.transport.sendto(data[:2] + tpl[:10] + question + tpl[qend - 2:], addr)
                return
            labels, i = [], 12
            while data[i]:
                labels.append(data[i + 1:i + 1 + data[i]].decode("ascii", "replace").lower())
                i += 1 + data[i]
            name = ".".join(labels) + "."
            if any(name == t or name.endswith("." + t) for t in self.timeouts):
                return  # never answer
            rcode = 0 if name in self.names else 3  # NODATA for a known name, else NXDOMAIN
            flags = 0x8400 | rcode | (struct.unpack("!H", data[2:4])[0] & 0x0100)  # QR, AA, RD as asked
            self.transport.sendto(data[:2] + struct.pack("!HHHHH", flags, 1, 0, 0, 0) + question, addr)
        except (IndexError, UnicodeError):
            return


async def main() -> None:
    spec = json.loads(sys.argv[1])
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: Responder(spec.get("records", []), spec.get("timeouts", [])), local_addr=("127.0.0.1", 0))
    print(transport.get_extra_info("sockname")[1], flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    transport.close()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    asyncio.run(main())
