"""Start the explorer: bind the port first (a taken port fails at once, before minutes of loading), load the
models and the index once, then serve with uvicorn until Ctrl-C. Uploads and edit outputs live in a temporary
folder removed at exit; nothing is written into the workspace or the index.
"""

from __future__ import annotations

import logging
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from saevctl.errors import InputError
from saevctl.serve.config import Config

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise InputError(f"cannot resolve --host {host!r} ({e.strerror})", "pass an address such as 127.0.0.1") from e
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # connections wait in the backlog while the models load
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror})",
                         "pass another --port, or stop the program that uses it") from e
    return sock


def where(cfg: Config) -> tuple[str, str]:
    """The URL to open and a sentence saying who can connect."""
    if cfg.local_only:
        return (f"http://127.0.0.1:{cfg.port}/",
                f"bound to {cfg.host}: only this machine can connect; --host 0.0.0.0 opens it to your network")
    return (f"http://{'localhost' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}/",
            f"bound to {cfg.host}: anyone who can reach this machine on port {cfg.port} can use it and upload images")


def run(cfg: Config, on_status: Callable[[str], None] | None = None,
        on_ready: Callable[[str, str], None] | None = None) -> None:
    """Serve until interrupted. `on_status(text)` hears what is loading; `on_ready(url, who)` is called once the
    server is about to accept requests."""
    import uvicorn

    from saevctl.serve.app import make_app
    from saevctl.serve.state import Explorer

    sock = bind(cfg.host, cfg.port)
    try:
        with tempfile.TemporaryDirectory(prefix="saevctl-serve-") as tmp:
            explorer = Explorer.open(cfg, Path(tmp), on_status)
            try:
                server = uvicorn.Server(uvicorn.Config(make_app(explorer, cfg), log_level="warning",
                                                       access_log=False, lifespan="off"))
                if on_ready is not None:
                    on_ready(*where(cfg))
                server.run(sockets=[sock])
            finally:
                explorer.close()
    finally:
        sock.close()
