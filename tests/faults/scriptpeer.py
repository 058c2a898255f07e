"""A scripted SMTP peer on loopback for the faults smtp-sink cannot play: one that accepts
connections and never says a word, one that offers AUTH without TLS (and records whether a
client sent credentials), and one whose TLS certificate can be swapped while it runs. It
records every line it received.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading


class ScriptPeer:
    """``mode``: "silent" (accept, never answer) or "smtp". ``ehlo``: the extension lines.
    ``tls``: a server SSLContext for STARTTLS (change its certificate with ``load_cert_chain``
    while the peer runs: new handshakes use the new one)."""

    def __init__(self, host: str, port: int, mode: str = "smtp", ehlo: tuple[str, ...] = ("PIPELINING",),
                 tls: ssl.SSLContext | None = None, close_after_message: bool = False) -> None:
        self.mode, self.ehlo, self.tls = mode, ehlo, tls
        self.close_after_message = close_after_message
        self.lines: list[bytes] = []
        self.messages: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with peer._lock:
                    peer.connections += 1
                if peer.mode == "silent":
                    peer._stop.wait()
                    return
                try:
                    peer._serve(self.request)
                except (OSError, ssl.SSLError, EOFError):
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server((host, port), Handler)
        self.host, self.port = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def transcript(self) -> bytes:
        with self._lock:
            return b"".join(self.lines)

    def _serve(self, sock: socket.socket) -> None:
        f = sock.makefile("rb")

        def send(line: str) -> None:
            sock.sendall(line.encode() + b"\r\n")

        def readline() -> bytes:
            line = f.readline(65536)
            if not line:
                raise EOFError
            with self._lock:
                self.lines.append(line)
            return line

        send("220 peer.test ESMTP")
        tls = False
        while True:
            cmd = readline().strip().upper()
            if cmd.startswith((b"EHLO", b"HELO")):
                ext = list(self.ehlo) + (["STARTTLS"] if self.tls and not tls else [])
                send("\r\n".join(["250-peer.test"] + [f"250-{e}" for e in ext[:-1]] + [f"250 {ext[-1]}"])
                     if ext else "250 peer.test")
            elif cmd == b"STARTTLS" and self.tls and not tls:
                send("220 go ahead")
                sock = self.tls.wrap_socket(sock, server_side=True)
                f = sock.makefile("rb")
                tls = True
            elif cmd.startswith(b"AUTH"):
                send("535 5.7.8 no")
            elif cmd.startswith((b"MAIL", b"RCPT", b"RSET", b"NOOP")):
                send("250 ok")
            elif cmd == b"DATA":
                send("354 go")
                data = b""
                while not data.endswith(b"\r\n.\r\n") and data != b".\r\n":
                    data += f.readline(1 << 20) or b"\r\n.\r\n"
                with self._lock:
                    self.messages.append(data)
                send("250 ok")
                if self.close_after_message:
                    return
            elif cmd == b"QUIT":
                send("221 bye")
                return
            else:
                send("502 no")

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
