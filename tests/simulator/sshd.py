"""A real OpenSSH server (``/usr/sbin/sshd -D``) on 127.0.0.1, for the SSH client tests: a
headnode to ``ProxyJump`` through, and a server that checks OpenSSH user certificates.

Its own config, host key, authorized_keys and (optionally) ``TrustedUserCAKeys`` live in
one temporary directory; it logs to stderr at DEBUG1 (its ``direct-tcpip`` requests show
what went through it). Only root may log in, by public key or certificate.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class OpenSshServer:
    def __init__(self, directory: Path, authorized_keys: str, *, trusted_ca: str | None = None) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.host_key = directory / "ssh_host_ed25519_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sshd-test", "-f", str(self.host_key)],
            check=True,
        )
        (directory / "authorized_keys").write_text(authorized_keys)
        self.port = free_port()
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"PidFile {directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            "AuthenticationMethods publickey",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp",  # what QEMU's ssh block driver uses
            "LogLevel DEBUG1",
        ]
        if trusted_ca is not None:
            (directory / "trusted_ca.pub").write_text(trusted_ca)
            lines.append(f"TrustedUserCAKeys {directory / 'trusted_ca.pub'}")
        config = directory / "sshd_config"
        config.write_text("\n".join(lines) + "\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        self.log_path = directory / "sshd.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(config)], stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {self.log_path.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        raise RuntimeError("sshd did not listen within 30 s")

    @property
    def host_key_line(self) -> str:
        """The known_hosts line of this server."""
        kind, blob = Path(str(self.host_key) + ".pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}\n"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
