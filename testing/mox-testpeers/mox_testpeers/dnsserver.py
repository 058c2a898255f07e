"""Authoritative DNS server on loopback for tests, built on dnspython.

The server answers UDP and TCP on one free port of 127.0.0.1, from a zone held as Python data
that tests may change while it runs::

    server = DNSServer().start()
    server.add("example.org", "MX", "10 mx1.example.org.")
    server.add("mx1.example.org", "A", "127.0.0.2")
    server.add("sel._domainkey.example.org", "TXT", "v=DKIM1; k=rsa; p=" + 400 * "A")  # split in 255-byte strings
    server.add_null_mx("nomail.example.org")                   # MX 0 .
    server.fail("broken.example", "MX", "SERVFAIL")             # or "TIMEOUT", "NXDOMAIN", "NODATA", "REFUSED", ...
    resolver = resolver_for(server)                             # dns.asyncresolver.Resolver, no /etc/resolv.conf
    server.stop()

Semantics:

* Every name is absolute (a missing trailing dot is added); names compare case-insensitively.
* Rdata is given in zone-file syntax (``"10 mx1.example.org."``); relative names in it are taken
  relative to the root, so the trailing dot is optional. ``Rdata`` objects are accepted too.
* TXT (and SPF) values are the *logical text*, not zone-file syntax: a ``str``/``bytes`` value is
  split into 255-byte character-strings (as DKIM keys need); a ``list``/``tuple`` gives the strings
  explicitly.
* A name that has no records but has records below it (an empty non-terminal) gets NODATA; a name
  that does not exist gets NXDOMAIN. A name with records but not of the asked type gets NODATA.
  Negative answers carry the SOA of the closest enclosing name that has one (add it with
  ``server.add("example.org", "SOA", "ns.example.org. admin.example.org. 1 3600 600 86400 60")``).
* CNAMEs are followed within the data (up to 8 hops) and the chain is put in the answer.
* Failures are per name and optionally per type, optionally for the next *times* queries only:
  ``TIMEOUT`` (no answer at all, over UDP and TCP), ``NXDOMAIN``, ``NODATA`` and every rcode name
  (``SERVFAIL``, ``REFUSED``, ``FORMERR``, ``NOTIMP``...), and ``TRUNCATE`` (UDP answers get the
  TC bit, so resolvers retry over TCP, which answers normally). ``delay()`` slows answers down.
* ``server.queries`` records every question received, as :class:`Query` tuples.
* Records have TTL 0 unless given one (``ttl=`` on :meth:`add`/:meth:`set`, or ``default_ttl``):
  mox's resolvers cache answers for their TTL, and tests change records while a server runs, so
  by default nothing is cached. A test about caching gives its records a TTL.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.resolver
import dns.rrset

from . import PeerError
from .lifecycle import Peer

__all__ = ["DNSServer", "Query", "resolver_for", "sync_resolver_for", "TIMEOUT", "NODATA", "TRUNCATE"]

TIMEOUT = "TIMEOUT"
NODATA = "NODATA"
TRUNCATE = "TRUNCATE"
_SPECIAL_MODES = {TIMEOUT, NODATA, TRUNCATE}

IN = dns.rdataclass.IN
_MAX_CNAME_HOPS = 8


class Query(NamedTuple):
    """One question received by the server."""

    name: str  # absolute, lower case, with trailing dot
    rdtype: str  # "MX", "A", ...
    proto: str  # "udp" or "tcp"
    time: float  # time.monotonic() when received


@dataclass
class _Failure:
    mode: str
    times: int | None  # None: forever


def _name(name: str | dns.name.Name) -> dns.name.Name:
    if isinstance(name, dns.name.Name):
        return name if name.is_absolute() else name.concatenate(dns.name.root)
    return dns.name.from_text(name, origin=dns.name.root)


def _rdtype(rdtype: str | int | None) -> int | None:
    if rdtype is None:
        return None
    if isinstance(rdtype, int):
        return dns.rdatatype.RdataType.make(rdtype)
    return dns.rdatatype.from_text(rdtype.upper())


def _split_255(data: bytes) -> list[bytes]:
    if not data:
        return [b""]
    return [data[i:i + 255] for i in range(0, len(data), 255)]


def _make_rdata(rdtype: int, value) -> dns.rdata.Rdata:
    if isinstance(value, dns.rdata.Rdata):
        if value.rdtype != rdtype:
            raise ValueError(f"rdata type {dns.rdatatype.to_text(value.rdtype)} given for "
                             f"{dns.rdatatype.to_text(rdtype)}")
        return value
    if rdtype in (dns.rdatatype.TXT, dns.rdatatype.SPF):
        if isinstance(value, (list, tuple)):
            strings = [v.encode() if isinstance(v, str) else bytes(v) for v in value]
            for s in strings:
                if len(s) > 255:
                    raise ValueError("an explicit TXT character-string is longer than 255 bytes")
        else:
            strings = _split_255(value.encode() if isinstance(value, str) else bytes(value))
        cls = dns.rdtypes.ANY.TXT.TXT if rdtype == dns.rdatatype.TXT else dns.rdata.get_rdata_class(IN, rdtype)
        return cls(IN, rdtype, strings)
    return dns.rdata.from_text(IN, rdtype, value, origin=dns.name.root, relativize=False)


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = False


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class DNSServer(Peer):
    """Authoritative DNS server on ``host`` (127.0.0.1), UDP and TCP on the same port.

    It runs in this process, in two threads (UDP and TCP), ready once both sockets are bound.
    """

    kind = "DNS server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, default_ttl: int = 0):
        super().__init__()
        self.host = host
        self._want_port = port
        self.port = 0
        self.default_ttl = default_ttl
        self._lock = threading.RLock()
        # name -> rdtype -> (ttl, [rdata])
        self._data: dict[dns.name.Name, dict[int, tuple[int, list[dns.rdata.Rdata]]]] = {}
        self._failures: dict[tuple[dns.name.Name, int | None], _Failure] = {}
        self._delays: dict[tuple[dns.name.Name, int | None], float] = {}
        self.queries: list[Query] = []
        #: exceptions raised while answering (each answered with SERVFAIL)
        self.errors: list[BaseException] = []
        self._udp: _UDPServer | None = None
        self._tcp: _TCPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # ---------------------------------------------------------------- lifecycle

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def start(self, timeout: float | None = None) -> DNSServer:
        if self._udp is not None:
            return self
        return super().start(timeout)

    def _start_tries(self) -> int:
        # with a free port: the UDP one the kernel chose may be taken for TCP; choose again
        return 1 if self._want_port else 50

    def _launch(self, timeout: float) -> None:
        handler_udp, handler_tcp = self._handlers()
        udp = None
        try:
            udp = _UDPServer((self.host, self._want_port), handler_udp)
            port = udp.server_address[1]
            tcp = _TCPServer((self.host, port), handler_tcp)
        except OSError as e:
            if udp is not None:
                udp.server_close()
            raise PeerError(f"could not bind {self.host}:{self._want_port or '(free port)'}: {e}") from None
        self._udp, self._tcp, self.port = udp, tcp, port
        self._stopping.clear()
        for srv, label in ((self._udp, "udp"), (self._tcp, "tcp")):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                 name=f"testdns-{label}-{self.port}", daemon=True)
            t.start()
            self._threads.append(t)

    def _halt(self) -> None:
        self._stopping.set()
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for t in self._threads:
            t.join(2)
        self._threads.clear()
        self._udp = self._tcp = None

    # ---------------------------------------------------------------- zone data

    def add(self, name: str, rdtype: str, value, ttl: int | None = None) -> DNSServer:
        """Add one record (keeps the existing records of that name and type)."""
        n, t = _name(name), _rdtype(rdtype)
        rd = _make_rdata(t, value)
        with self._lock:
            node = self._data.setdefault(n, {})
            old_ttl, rds = node.get(t, (ttl if ttl is not None else self.default_ttl, []))
            if t == dns.rdatatype.CNAME and rds:
                raise ValueError(f"{n} already has a CNAME")
            if rd not in rds:
                rds = rds + [rd]
            node[t] = (ttl if ttl is not None else old_ttl, rds)
        return self

    def set(self, name: str, rdtype: str, values: Iterable, ttl: int | None = None) -> DNSServer:
        """Replace all records of that name and type (an empty *values* removes them)."""
        n, t = _name(name), _rdtype(rdtype)
        if isinstance(values, (str, bytes, dns.rdata.Rdata)):
            values = [values]
        rds = [_make_rdata(t, v) for v in values]
        with self._lock:
            if not rds:
                self._remove(n, t)
            else:
                self._data.setdefault(n, {})[t] = (ttl if ttl is not None else self.default_ttl, rds)
        return self

    def remove(self, name: str, rdtype: str | None = None) -> DNSServer:
        """Remove the records of *name* (of one type, or all)."""
        with self._lock:
            self._remove(_name(name), _rdtype(rdtype))
        return self

    def _remove(self, n: dns.name.Name, t: int | None) -> None:
        node = self._data.get(n)
        if node is None:
            return
        if t is None:
            node.clear()
        else:
            node.pop(t, None)
        if not node:
            del self._data[n]

    def clear(self) -> None:
        """Remove all records, failures, delays and the query log."""
        with self._lock:
            self._data.clear()
            self._failures.clear()
            self._delays.clear()
            self.queries.clear()

    def add_null_mx(self, name: str, ttl: int | None = None) -> DNSServer:
        """RFC 7505 null MX: ``name MX 0 .``."""
        return self.set(name, "MX", ["0 ."], ttl)

    def add_mx_host(self, domain: str, host: str, preference: int = 10, *, a: str | list[str] | None = None,
                    aaaa: str | list[str] | None = None) -> DNSServer:
        """``domain MX preference host`` plus A/AAAA records for host."""
        self.add(domain, "MX", f"{preference} {_name(host).to_text()}")
        for rdtype, vals in (("A", a), ("AAAA", aaaa)):
            for v in [vals] if isinstance(vals, str) else (vals or []):
                self.add(host, rdtype, v)
        return self

    def records(self, name: str, rdtype: str) -> list[str]:
        """The records of that name and type, as zone-file text."""
        with self._lock:
            node = self._data.get(_name(name), {})
            _, rds = node.get(_rdtype(rdtype), (0, []))
            return [rd.to_text() for rd in rds]

    # ---------------------------------------------------------------- failures

    def fail(self, name: str, rdtype: str | None = None, mode: str = "SERVFAIL", *,
             times: int | None = None) -> DNSServer:
        """Answer queries for *name* (and *rdtype*, or every type if None) with a failure.

        *mode*: ``"TIMEOUT"`` (never answer), ``"NXDOMAIN"``, ``"NODATA"`` (NOERROR, empty
        answer), ``"TRUNCATE"`` (TC bit over UDP; TCP answers normally), or any rcode name
        (``"SERVFAIL"``, ``"REFUSED"``, ``"FORMERR"``...). With *times*, only the next *times*
        matching queries fail; after that the data is served again.
        """
        m = mode.upper()
        if m not in _SPECIAL_MODES:
            dns.rcode.from_text(m)  # validates
        with self._lock:
            self._failures[(_name(name), _rdtype(rdtype))] = _Failure(m, times)
        return self

    def timeout(self, name: str, rdtype: str | None = None, *, times: int | None = None) -> DNSServer:
        return self.fail(name, rdtype, TIMEOUT, times=times)

    def servfail(self, name: str, rdtype: str | None = None, *, times: int | None = None) -> DNSServer:
        return self.fail(name, rdtype, "SERVFAIL", times=times)

    def clear_failures(self, name: str | None = None, rdtype: str | None = None) -> None:
        """Remove all failures (or those of *name*, of one type or all types) and delays."""
        with self._lock:
            if name is None:
                self._failures.clear()
                self._delays.clear()
                return
            n, t = _name(name), _rdtype(rdtype)
            for table in (self._failures, self._delays):
                for key in list(table):
                    if key[0] == n and (t is None or key[1] == t):
                        del table[key]

    def delay(self, name: str, rdtype: str | None = None, seconds: float = 1.0) -> DNSServer:
        """Delay the answers for *name* (and *rdtype*) by *seconds*."""
        with self._lock:
            self._delays[(_name(name), _rdtype(rdtype))] = seconds
        return self

    def queries_for(self, name: str, rdtype: str | None = None) -> list[Query]:
        n = _name(name).to_text().lower()
        t = None if rdtype is None else dns.rdatatype.to_text(_rdtype(rdtype))
        with self._lock:
            return [q for q in self.queries if q.name == n and (t is None or q.rdtype == t)]

    # ---------------------------------------------------------------- answering

    def _take_failure(self, n: dns.name.Name, t: int) -> str | None:
        for key in ((n, t), (n, None)):
            f = self._failures.get(key)
            if f is None:
                continue
            if f.times is not None:
                if f.times <= 0:
                    continue
                f.times -= 1
            return f.mode
        return None

    def _has_descendants(self, n: dns.name.Name) -> bool:
        return any(other != n and other.is_subdomain(n) for other in self._data)

    def _soa_for(self, n: dns.name.Name) -> dns.rrset.RRset | None:
        while True:
            node = self._data.get(n)
            if node and dns.rdatatype.SOA in node:
                ttl, rds = node[dns.rdatatype.SOA]
                return dns.rrset.from_rdata_list(n, min(ttl, rds[0].minimum), rds)
            if n == dns.name.root:
                return None
            n = n.parent()

    def _answer(self, query: dns.message.Message, proto: str) -> tuple[dns.message.Message | None, float, bool]:
        """Build the response; returns (response or None for no answer, delay, truncate)."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response, 0.0, False
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response, 0.0, False
        q = query.question[0]
        qname, qtype = q.name, q.rdtype
        with self._lock:
            self.queries.append(Query(qname.to_text().lower(), dns.rdatatype.to_text(qtype), proto,
                                      time.monotonic()))
            delay = self._delays.get((qname, qtype), self._delays.get((qname, None), 0.0))
            mode = self._take_failure(qname, qtype)
            truncate = False
            if mode == TIMEOUT:
                return None, delay, False
            if mode == TRUNCATE:
                truncate = proto == "udp"
                mode = None
            if mode == NODATA:
                soa = self._soa_for(qname)
                if soa is not None:
                    response.authority.append(soa)
                return response, delay, False
            if mode is not None:
                response.set_rcode(dns.rcode.from_text(mode))
                if mode == "NXDOMAIN":
                    soa = self._soa_for(qname)
                    if soa is not None:
                        response.authority.append(soa)
                return response, delay, False

            name = qname
            rcode = dns.rcode.NOERROR
            negative = False
            for _ in range(_MAX_CNAME_HOPS):
                node = self._data.get(name)
                if node is None:
                    negative = True
                    if not self._has_descendants(name):
                        rcode = dns.rcode.NXDOMAIN
                    break
                if qtype == dns.rdatatype.ANY:
                    for ttl, rds in node.values():
                        response.answer.append(dns.rrset.from_rdata_list(name, ttl, rds))
                    break
                if qtype in node:
                    ttl, rds = node[qtype]
                    response.answer.append(dns.rrset.from_rdata_list(name, ttl, rds))
                    break
                if dns.rdatatype.CNAME in node:
                    ttl, rds = node[dns.rdatatype.CNAME]
                    response.answer.append(dns.rrset.from_rdata_list(name, ttl, rds))
                    name = rds[0].target
                    continue
                negative = True
                break
            response.set_rcode(rcode)
            if negative:
                soa = self._soa_for(name)
                if soa is not None:
                    response.authority.append(soa)
            return response, delay, truncate

    def _wire(self, query: dns.message.Message, response: dns.message.Message, max_size: int,
              truncate: bool) -> bytes:
        if not truncate:
            try:
                return response.to_wire(max_size=max_size)
            except dns.exception.TooBig:
                pass
        response.answer.clear()
        response.authority.clear()
        response.additional.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=max_size)

    def _handle(self, wire: bytes, proto: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.message.ShortHeader:
            return None
        except Exception:
            # Unparseable question: FORMERR with the id echoed if there is one.
            if len(wire) >= 2:
                return wire[:2] + struct.pack("!HHHHH", 0x8001, 0, 0, 0, 0)
            return None
        try:
            response, delay, truncate = self._answer(query, proto)
        except Exception as e:  # a bug here must show up as SERVFAIL plus server.errors, not a hang
            self.errors.append(e)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            delay, truncate = 0.0, False
        if delay:
            time.sleep(delay)
        if response is None:
            return None
        if proto == "udp":
            max_size = max(512, query.payload) if query.edns >= 0 else 512
        else:
            max_size = 65535
        return self._wire(query, response, max_size, truncate)

    def _handlers(self):
        server = self

        class UDPHandler(socketserver.BaseRequestHandler):
            def handle(self):
                data, sock = self.request
                reply = server._handle(data, "udp")
                if reply is not None:
                    try:
                        sock.sendto(reply, self.client_address)
                    except OSError:
                        pass

        class TCPHandler(socketserver.BaseRequestHandler):
            def handle(self):
                conn: socket.socket = self.request
                conn.settimeout(0.2)
                buf = b""
                while not server._stopping.is_set():
                    try:
                        chunk = conn.recv(65537)
                    except TimeoutError:
                        continue
                    except OSError:
                        return
                    if not chunk:
                        return
                    buf += chunk
                    while len(buf) >= 2:
                        (length,) = struct.unpack("!H", buf[:2])
                        if len(buf) < 2 + length:
                            break
                        msg, buf = buf[2:2 + length], buf[2 + length:]
                        reply = server._handle(msg, "tcp")
                        if reply is not None:
                            try:
                                conn.sendall(struct.pack("!H", len(reply)) + reply)
                            except OSError:
                                return

        return UDPHandler, TCPHandler

    # ---------------------------------------------------------------- clients

    def resolver(self, **kw) -> dns.asyncresolver.Resolver:
        return resolver_for(self, **kw)

    def sync_resolver(self, **kw) -> dns.resolver.Resolver:
        return sync_resolver_for(self, **kw)


def _configure(r: dns.resolver.BaseResolver, server: DNSServer, timeout: float, lifetime: float | None) -> None:
    r.nameservers = [dns.nameserver.Do53Nameserver(server.host, server.port)]
    r.port = server.port
    r.timeout = timeout
    r.lifetime = lifetime if lifetime is not None else max(timeout, 2 * timeout)
    r.cache = None
    r.search = []
    r.domain = dns.name.root
    r.use_search_by_default = False


def resolver_for(server: DNSServer, *, timeout: float = 2.0, lifetime: float | None = None) -> dns.asyncresolver.Resolver:
    """A ``dns.asyncresolver.Resolver`` that asks only *server* (no /etc/resolv.conf, no cache).

    *timeout* is per query attempt; *lifetime* (default 2 x timeout) bounds the whole resolution.
    """
    r = dns.asyncresolver.Resolver(configure=False)
    _configure(r, server, timeout, lifetime)
    return r


def sync_resolver_for(server: DNSServer, *, timeout: float = 2.0, lifetime: float | None = None) -> dns.resolver.Resolver:
    """Like :func:`resolver_for`, but a synchronous ``dns.resolver.Resolver``."""
    r = dns.resolver.Resolver(configure=False)
    _configure(r, server, timeout, lifetime)
    return r
