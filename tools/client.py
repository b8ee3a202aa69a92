#!/usr/bin/env python3
"""A small interactive client for mbroker.

    python3 tools/client.py user 42 [--host 127.0.0.1] [--port 9099]
        connects as user 42 and prints every notification as it arrives.

    python3 tools/client.py source [--host 127.0.0.1] [--port 9090] [--terminator lf]
        reads event lines (e.g. ``1|F|60|50``) from stdin and sends each to the event
        port, ended by ``\\r\\n`` (or ``\\n`` with --terminator lf).

Standard library only. Ctrl-C or end of input ends it. A connection error is one line
naming the broker's address, with exit code 1.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

CONNECT_TIMEOUT_SECONDS = 10


class ClientError(Exception):
    """A failure to report in one line, naming the broker address."""


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


def connect(host: str, port: int) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS)
    except OSError as error:
        raise ClientError(f"cannot connect to {address(host, port)}: {reason(error)}") from None


def run_user(host: str, port: int, user: str, terminator: bytes) -> int:
    with connect(host, port) as sock:
        sock.sendall(user.encode("ascii") + terminator)
        # No timeout after connecting: notifications come whenever events do.
        sock.settimeout(None)
        print(f"connected as user {user} to {host}:{port}", file=sys.stderr, flush=True)
        output = sys.stdout.buffer
        while True:
            data = sock.recv(65536)
            if not data:
                print("the broker closed the connection", file=sys.stderr)
                return 0
            # The bytes exactly as the broker sent them, terminators included.
            output.write(data)
            output.flush()


def run_source(host: str, port: int, terminator: bytes) -> int:
    with connect(host, port) as sock:
        print(f"connected as the event source to {host}:{port}; type events like "
              "1|F|60|50, end with Ctrl-D", file=sys.stderr, flush=True)
        sent = 0
        for line in sys.stdin.buffer:
            payload = line.rstrip(b"\r\n")
            if not payload:
                continue
            sock.sendall(payload + terminator)
            sent += 1
        print(f"sent {sent} event line(s)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="client", description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    user_parser = modes.add_parser("user", help="connect as a user and print notifications")
    user_parser.add_argument("user_id", help="the user id to announce, e.g. 42")
    user_parser.add_argument("--port", type=int, default=9099, help="client port (9099)")
    source_parser = modes.add_parser("source", help="send event lines read from stdin")
    source_parser.add_argument("--port", type=int, default=9090, help="event port (9090)")
    for mode_parser in (user_parser, source_parser):
        mode_parser.add_argument("--host", default="127.0.0.1", help="broker host (127.0.0.1)")
        mode_parser.add_argument("--terminator", choices=["crlf", "lf"], default="crlf",
                                 help="line terminator to send (crlf)")
    arguments = parser.parse_args(argv)
    terminator = b"\n" if arguments.terminator == "lf" else b"\r\n"
    try:
        if arguments.mode == "user":
            return run_user(arguments.host, arguments.port, arguments.user_id, terminator)
        return run_source(arguments.host, arguments.port, terminator)
    except KeyboardInterrupt:
        return 0
    except ClientError as error:
        print(f"client.py: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"client.py: connection to {address(arguments.host, arguments.port)} failed: "
              f"{reason(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
