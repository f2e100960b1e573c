"""uvicorn in a thread of the node's process: the console starts and stops with the node.

HTTPS when ``[web] cert_file`` and ``key_file`` are set (TLS 1.2 or later). A console that cannot listen (the port
taken) stops the node's start with a clear error, as an SCP port that cannot be bound does.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time

import uvicorn
from fastapi import FastAPI

from node.config import Settings

log = logging.getLogger(__name__)
START_S = 30.0


class WebError(RuntimeError):
    """The console could not start listening."""


class WebServer:
    """The console's HTTP server, running in a daemon thread."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        web = settings.web
        tls = bool(web.cert_file)
        config = uvicorn.Config(
            app, host=web.bind_address, port=web.port, log_level="warning", access_log=False,
            ssl_certfile=str(settings.resolve(web.cert_file)) if tls else None,
            ssl_keyfile=str(settings.resolve(web.key_file)) if tls else None,
            ssl_version=ssl.PROTOCOL_TLS_SERVER, lifespan="off", server_header=False)
        self.server = uvicorn.Server(config)
        self.scheme = "https" if tls else "http"
        self.bind_address = web.bind_address
        self._thread = threading.Thread(target=self._run, name="web", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as exc:  # uvicorn exits (SystemExit) when it cannot bind
            self._error = exc

    def start(self) -> None:
        """Start listening; returns once the socket is bound.

        Raises:
            WebError: the port could not be bound (or the certificate could not be loaded).
        """
        if self.scheme == "https":  # TLS 1.2+: uvicorn takes a protocol, not a minimum; check the files here
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            cfg = self.server.config
            try:
                context.load_cert_chain(str(cfg.ssl_certfile), str(cfg.ssl_keyfile))
            except (OSError, ssl.SSLError) as exc:
                raise WebError(f"console certificate not usable ({cfg.ssl_certfile}, {cfg.ssl_keyfile}): {exc}") \
                    from exc
        self._thread.start()
        deadline = time.monotonic() + START_S
        while not self.server.started:
            if not self._thread.is_alive():
                raise WebError(f"console could not listen on {self.bind_address}:{self.server.config.port} "
                               f"(the port is in use, or the address is not this machine's): {self._error!r}")
            if time.monotonic() > deadline:
                raise WebError(f"console not listening after {START_S:.0f} s")
            time.sleep(0.05)
        log.info("console on %s", self.url)

    @property
    def port(self) -> int:
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return int(self.server.config.port)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.bind_address in ("0.0.0.0", "") else self.bind_address
        return f"{self.scheme}://{host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
