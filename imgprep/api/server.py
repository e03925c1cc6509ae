"""``imgprep serve``: bind, settle the previous run, serve with uvicorn, stop cleanly.

Start: refuse an unauthenticated non-loopback address, take the state directory's
server lock (two servers would fail each other's queued jobs), bind the socket (so a
bad address is an input error, exit 2), settle what a previous run left behind, then
serve. Stop (SIGTERM/SIGINT): uvicorn stops accepting and finishes open requests,
then the queue fails the jobs that never started, cancels the running ones and waits
for their rollback. Further signals during that wait are ignored: leaving a VM
half-prepared is worse than waiting (SIGKILL remains, and ``recover`` after it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TextIO

import uvicorn

from imgprep.api.auth import check_exposure, parse_listen
from imgprep.api.files import ContentMd5Cache
from imgprep.api.queue import JobQueue, settle_previous_run
from imgprep.api.routes import build_app
from imgprep.api.service import Service, compute_nodes
from imgprep.api.tokenfile import load_or_create, token_path
from imgprep.config import Config
from imgprep.errors import InvalidInput
from imgprep.jobstore import JobStore

log = logging.getLogger(__name__)
GRACEFUL_SECONDS = 10  # for open HTTP requests (downloads) once a stop is requested


class _Server(uvicorn.Server):
    stop_reason = "shutdown"

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stop_reason = signal.Signals(sig).name
        super().handle_exit(sig, frame)


@contextlib.contextmanager
def _server_lock(state_dir: Path) -> Iterator[None]:
    path = state_dir / "serve.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise InvalidInput(
                f"another imgprep serve (pid {holder}) is using the state directory {state_dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise InvalidInput(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _stop_signals_to(server: _Server) -> Iterator[None]:
    """Route SIGINT/SIGTERM to the server for the whole serve, not only while uvicorn
    listens: a signal that arrives before uvicorn installs its handlers still stops it,
    uvicorn's re-raise of the signals it caught lands here (not on the default action,
    which would kill the process), and signals during the rollback wait change nothing."""
    previous = {s: signal.signal(s, server.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(config: Config, *, listen: str | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    host, port = parse_listen(listen or config.serve.listen)
    check_exposure(host, config.serve.token)
    backend = config.serve.backend
    if backend == "smartos":
        backend += f" on {', '.join(compute_nodes(config))}"
    image_dir = Path(config.serve.image_dir).expanduser() if config.serve.image_dir else config.state_dir / "images"
    store = JobStore(config.state_dir)
    token, generated = (config.serve.token, False) if config.serve.token else load_or_create(config.state_dir)
    try:
        image_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise InvalidInput(f"image directory {image_dir}: cannot create it: {exc.strerror}") from None
    image_dir = image_dir.resolve()
    with _server_lock(config.state_dir), _bind(host, port) as sock:
        queue = JobQueue(config, store, workers=config.serve.workers)
        service = Service(config=config, store=store, queue=queue, image_dir=image_dir, md5=ContentMd5Cache())
        queue.on_success = service.precompute_md5
        server = _Server(
            uvicorn.Config(
                build_app(service, token),
                log_config=None,
                lifespan="off",
                timeout_graceful_shutdown=GRACEFUL_SECONDS,
                server_header=False,
                access_log=log.isEnabledFor(logging.DEBUG),
            )
        )
        with _stop_signals_to(server):
            try:
                queue.start_recovery(settle_previous_run(config, store))
                bound_host, bound_port = sock.getsockname()[:2]
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                if config.serve.token:
                    auth = "bearer token (serve.token)"
                else:
                    auth = f"bearer token in {token_path(config.state_dir)}{' (generated)' if generated else ''}"
                out.write(
                    f"imgprep serve: listening on http://{shown}:{bound_port} "
                    f"(backend: {backend}, workers: {config.serve.workers}, auth: {auth}, images: {image_dir})\n"
                )
                out.flush()
                server.run(sockets=[sock])
            finally:
                queue.shutdown(server.stop_reason)
        out.write(f"imgprep serve: stopped ({server.stop_reason})\n")
        out.flush()
    return 0
