"""API test fixtures: real ``imgprep serve`` processes on a free loopback port, and httpx.

``start_server(fake=False)`` runs the installed ``imgprep`` command itself.
``start_server(fake=True)`` runs the same CLI through tests/api/fakeserve.py, whose
only difference is the FAKE backend (jobs run without a VM). Every server gets its
own state directory; nothing touches the host beyond it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
WAIT_TIMEOUT = 30.0  # an upper bound for a fake job to reach a state; never asserted on


def imgprep_command() -> list[str]:
    script = Path(sys.executable).parent / "imgprep"
    return [str(script)] if script.exists() else [sys.executable, "-m", "imgprep"]


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    state_dir: Path
    stderr_path: Path
    token: str | None

    def client(self, token: str | None = None, *, auth: bool = True) -> httpx.Client:
        headers = {}
        if auth and (token or self.token):
            headers["Authorization"] = f"Bearer {token or self.token}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def output(self) -> str:
        """Everything the server wrote on stdout after its first line (call after stop)."""
        assert self.proc.stdout is not None
        return self.proc.stdout.read()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def write_config(path: Path, serve: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"serve": serve}))
    return path


def spawn(
    state_dir: Path,
    *args: str,
    fake_world: Path | None = None,
    config: Path | None = None,
) -> tuple[subprocess.Popen[str], Path]:
    env = {**os.environ, "IMGPREP_STATE_DIR": str(state_dir)}
    env.pop("IMGPREP_CONFIG", None)
    if fake_world is not None:
        env["IMGPREP_FAKE_WORLD"] = str(fake_world)
        cmd = [sys.executable, "-m", "tests.api.fakeserve"]
    else:
        cmd = imgprep_command()
    cmd += ["serve", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    stderr_path = state_dir.parent / f"serve-{time.monotonic_ns()}.stderr"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    return proc, stderr_path


def read_listening_line(proc: subprocess.Popen[str], stderr_path: Path) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    match = re.search(r"listening on (http://\S+)", line)
    if match is None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"server did not start: {line!r}\n{stderr_path.read_text()}")
    return match.group(1)


def generated_token(state_dir: Path) -> str:
    """The token ``imgprep serve`` generated on first start (what an operator would read)."""
    return (state_dir / "serve.token").read_text().strip()


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str)
    assert body["message"]
    return body


def create(client: httpx.Client, vm: str, body: Any = None, **query: str) -> httpx.Response:
    params = {"action": "create-from-vm", "vm_uuid": vm, **query}
    return client.post("/images", params=params, json={"name": "img", "version": "1.0"} if body is None else body)


def nothing_created(client: httpx.Client) -> bool:
    return bool(client.get("/images", params={"state": "all"}).json() == [])


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    servers: list[Server] = []

    def start(
        *,
        fake: bool = True,
        state_dir: Path | None = None,
        workers: int = 1,
        token: str | None = None,
        listen: str = "127.0.0.1:0",
        extra: dict[str, Any] | None = None,
    ) -> Server:
        state = state_dir or tmp_path / "state"
        state.mkdir(exist_ok=True)
        serve: dict[str, Any] = {"workers": workers, **(extra or {})}
        if token is not None:
            serve["token"] = token
        config = write_config(tmp_path / "config.yaml", serve)
        proc, stderr_path = spawn(
            state, "--listen", listen, fake_world=tmp_path / "world" if fake else None, config=config
        )
        url = read_listening_line(proc, stderr_path)
        server = Server(proc, url, state, stderr_path, token or generated_token(state))
        servers.append(server)
        return server

    yield start
    for server in servers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.stop()


@pytest.fixture
def world(tmp_path: Path) -> Path:
    path = tmp_path / "world"
    (path / "vms").mkdir(parents=True)
    (path / "gates").mkdir()
    return path


def wait_for(what: str, probe: Callable[[], Any], timeout: float = WAIT_TIMEOUT) -> Any:
    """Poll until ``probe()`` returns something truthy; fail (not flake) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_job(client: httpx.Client, job_uuid: str, *executions: str, timeout: float = WAIT_TIMEOUT) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/jobs/{job_uuid}").json()
        return job if job["execution"] in executions else None

    result: dict[str, Any] = wait_for(f"job {job_uuid} to be {'/'.join(executions)}", probe, timeout)
    return result
