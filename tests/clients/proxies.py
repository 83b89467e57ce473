"""Real TCP proxies on loopback for the client tests, each relaying to `upstream` its own way: one that forgets a
connection as a load balancer past its idle timeout does, and one that terminates TLS as an ingress does."""
from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading


class LoopbackProxy:
    """Accepts connections on a free loopback port (`url`) and hands each to `_relay`, in a thread of its own."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):  # the listener closed at the end of the test
            while True:
                client = self.listener.accept()[0]
                threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        host, _, port = self.upstream.rpartition(":")
        return socket.create_connection((host, int(port)))

    def _relay(self, client: socket.socket):
        raise NotImplementedError

    def close(self):
        """The listener and every relayed connection (the server waits for its open connections when it stops)."""
        for s in (self.listener, *self.sockets):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class ForgetfulBalancer(LoopbackProxy):
    """A real TCP proxy on loopback that forgets a connection once it has relayed an answer on it, as a load
    balancer past its idle timeout does (AWS NLB, conntrack): the connection's next request gets a reset, while
    every new connection is relayed."""

    def _relay(self, client: socket.socket):
        upstream = self._connect_upstream()
        self.sockets += [client, upstream]
        answered = threading.Event()

        def back():
            with contextlib.suppress(OSError):
                while data := upstream.recv(65536):
                    client.sendall(data)
                    answered.set()
                client.shutdown(socket.SHUT_WR)

        threading.Thread(target=back, daemon=True).start()
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if answered.is_set():
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                upstream.sendall(data)
        with contextlib.suppress(OSError):
            upstream.shutdown(socket.SHUT_RDWR)  # a close alone would wait for the thread blocked in its recv
        client.close()


class TlsTerminator(LoopbackProxy):
    """A real TLS-terminating TCP proxy on loopback, as an ingress is: TLS with `context` towards its clients, plain
    TCP to `upstream` (a real server's HTTP port). A connection whose handshake fails is closed."""

    def __init__(self, upstream: str, context: ssl.SSLContext):
        self.context = context
        super().__init__(upstream)

    def _relay(self, connection: socket.socket):
        self.sockets.append(connection)
        try:
            outside = self.context.wrap_socket(connection, server_side=True)
        except OSError:  # a plain client, or one that refused the certificate
            connection.close()
            return
        inside = self._connect_upstream()
        self.sockets += [outside, inside]
        with contextlib.suppress(OSError), outside, inside:
            while True:  # one thread both ways: an SSL socket is not read and written from two threads at once
                ready = [outside] if outside.pending() else select.select([outside, inside], [], [])[0]
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    (inside if source is outside else outside).sendall(data)
