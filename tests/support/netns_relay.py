"""Runs inside a network namespace and lets a test reach a server there: `python netns_relay.py FD PORT` accepts
connections on the listening socket inherited as file descriptor FD (made in the test's namespace) and joins each
to 127.0.0.1:PORT in this one. Runs until killed."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading


def pump(source: socket.socket, sink: socket.socket) -> None:
    """Copies `source` to `sink` until either ends, then shuts both so the other direction ends too."""
    with contextlib.suppress(OSError):
        while data := source.recv(1 << 16):
            sink.sendall(data)
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)


def relay(client: socket.socket, port: int) -> None:
    """Joins one client to the server until one of them hangs up; a server not listening yet closes the client."""
    with client:
        try:
            server = socket.create_connection(("127.0.0.1", port))
        except OSError:
            return
        with server:
            back = threading.Thread(target=pump, args=(server, client), daemon=True)
            back.start()
            pump(client, server)
            back.join()


def main(listener_fd: int, port: int) -> None:
    listener = socket.socket(fileno=listener_fd)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=relay, args=(client, port), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
