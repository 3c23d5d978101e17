"""A real uvicorn server on 127.0.0.1 for an ASGI app, in a thread: the HTTP tests' server."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class UvicornServer:
    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        # keep-alive longer than any pause between a test's requests: a client reusing a connection
        # the server just closed gets "Server disconnected" (seen on a loaded machine)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=120))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
