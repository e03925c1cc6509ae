"""The command line: parse, call the library, map typed errors to exit codes.

Exit codes: 0 succeeded; 1 failed and the VM was restored; 2 bad input, nothing
touched; 3 the VM could NOT be restored (a finished image is kept; the message says
what to run); 130 canceled by SIGINT/SIGTERM (the VM was restored). A crash is one
line; its traceback only with --debug.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from imgprep import __version__
from imgprep.config import COMPRESSIONS, Config, load_config
from imgprep.errors import Cancelled, ImgprepError, InvalidInput, RestoreFailed
from imgprep.jobs import Job, build_request, job_is_running, job_needs_recovery, recover
from imgprep.jobstore import JobStore, Record
from imgprep.sanitize import clean
from imgprep.statedir import UMASK
from imgprep.workflow import CancelToken, cancel_on_signals

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_UNRESTORED, EXIT_CANCELED = 0, 1, 2, 3, 130
log = logging.getLogger("imgprep")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() owns the exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InvalidInput(message)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imgprep", description="Turn a prototype VM into a clean, reusable image.")
    parser.add_argument("--version", action="version", version=f"imgprep {__version__}")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    create = sub.add_parser("create", help="create an image from a VM")
    create.add_argument("--vm", required=True, help="VM UUID or name")
    create.add_argument("--backend", choices=["libvirt", "smartos"], default="libvirt")
    create.add_argument("--host", help="SmartOS compute node: [USER@]HOST[:PORT] or a name from the config")
    create.add_argument("--libvirt-uri", help="libvirt connection URI (default qemu:///system)")
    create.add_argument("--name", help="image name (default: the VM's name)")
    create.add_argument("--version", dest="image_version", help="image version (default: a UTC timestamp)")
    create.add_argument("--manifest", type=Path, help="JSON file with IMGAPI manifest fields")
    create.add_argument("--script", type=Path, help="operator script (default: imgprep's prepare-image)")
    create.add_argument("--compression", choices=COMPRESSIONS, help="image compression (default zstd)")
    create.add_argument(
        "--strict",
        action="store_true",
        default=None,
        help="fail (instead of warning) when the export exceeds what IMGAPI accepts (one file, at most 20 GiB)",
    )
    create.add_argument("--output-dir", type=Path, help="where to write the image and manifest")
    create.add_argument("--prepare-timeout", type=_positive_seconds, help="seconds for the script to finish")
    create.add_argument("--boot-timeout", type=_positive_seconds, help="seconds from boot to 'running'")
    create.add_argument("--shutdown-timeout", type=_positive_seconds, help="seconds from result to power-off")
    create.add_argument("--stop-timeout", type=_positive_seconds, help="seconds for a graceful stop")
    create.add_argument(
        "--agent-timeout",
        type=_positive_seconds,
        help="clone: seconds to wait for the guest agent to answer (and for each freeze/thaw call)",
    )
    create.add_argument(
        "--force-stop",
        action="store_true",
        default=None,
        help="power off if a graceful stop times out",
    )
    create.add_argument("--accept-new-host-key", action="store_true", help="SmartOS: trust an unknown host key")
    create.add_argument(
        "--capture",
        choices=["clone", "in-place"],
        help="libvirt: clone (default: the prototype keeps running, a throwaway clone is prepared) "
        "or in-place (the prototype is stopped, prepared and restored)",
    )
    create.add_argument(
        "--consistency",
        choices=["auto", "freeze", "stop", "crash"],
        help="clone of a running VM: freeze (guest agent), stop (shut down, start again at once), "
        "crash (as after a power loss); auto (default): freeze if the agent answers, else stop",
    )
    create.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="libvirt: boot the exported image once as a throwaway and check it (default: on; "
        "--no-verify turns it off)",
    )
    create.add_argument(
        "--keep-unverified",
        action="store_true",
        default=None,
        help="keep the image file when its verification fails (the job still fails)",
    )
    create.add_argument("--verify-timeout", type=_positive_seconds, help="seconds for the verification boot")
    create.add_argument("--disk", help="the disk to export, by target (e.g. vdb; default: the root filesystem's)")
    create.add_argument("--mode", choices=["early", "legacy"], default="early", help=argparse.SUPPRESS)
    create.add_argument("--config", type=Path, help="YAML config file")
    create.add_argument("--json", action="store_true", help="JSON events on stdout, one per line")

    jobs = sub.add_parser("jobs", help="inspect and recover jobs")
    jobs.add_argument("--config", type=Path, help="YAML config file")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, parser_class=_Parser)
    jobs_sub.add_parser("list", help="list jobs (flags those needing recovery)").add_argument(
        "--json", action="store_true"
    )
    jobs_sub.add_parser("get", help="print a job record as JSON").add_argument("job_uuid")
    rec = jobs_sub.add_parser("recover", help="finish the rollback of an interrupted or failed job")
    rec.add_argument("job_uuid")
    rec.add_argument(
        "--libvirt-uri", help="libvirt connection URI (default: the configuration's; never the job record's)"
    )
    rec.add_argument("--json", action="store_true")

    serve = sub.add_parser("serve", help="IMGAPI-compatible HTTP job API")
    serve.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:8480)")
    serve.add_argument("--config", type=Path, help="YAML config file")
    return parser


def load_effective_config(path: Path | None) -> Config:
    base = Config()
    env_state = os.environ.get("IMGPREP_STATE_DIR")
    if env_state:
        base = base.with_overrides(state_dir=Path(env_state))
    path = path or (Path(os.environ["IMGPREP_CONFIG"]) if os.environ.get("IMGPREP_CONFIG") else None)
    return load_config(path, base) if path else base


# --- output -------------------------------------------------------------------------


class JsonEvents:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def emit(self, event: dict[str, Any]) -> None:
        self.out.write(json.dumps({"at": time.time(), **event}, sort_keys=True) + "\n")
        self.out.flush()


class HumanEvents:
    """Progress on stderr: one line per step, a progress bar while exporting."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.t0 = time.monotonic()
        self.tty = err.isatty()
        self._bar_at = -10.0

    def emit(self, event: dict[str, Any]) -> None:
        stamp = f"[{time.monotonic() - self.t0:6.1f}s]"
        kind = event.get("event")
        if kind == "step":
            status = event["status"]
            if status == "started":
                return
            extra = f" ({event['elapsed']:.1f}s)" if "elapsed" in event else ""
            prefix = {"onerror_results": "rollback: ", "always_results": "restore: "}.get(event.get("chain", ""), "")
            line = f"{stamp} {prefix}{event['step']}: {status}{extra}"
            if status == "failed":
                line += f": {clean(event['error']['message'])}"
            self._line(line)
        elif kind == "guest":
            self._line(f"{stamp} guest: {event['state']}")
        elif kind == "warning":
            self._line(f"{stamp} warning: {event['message']}")
        elif kind == "progress":
            pct = float(event["percent"])
            if self.tty:
                filled = int(pct / 100 * 30)
                self.err.write(f"\r{stamp} export [{'#' * filled}{'.' * (30 - filled)}] {pct:5.1f}%")
                self.err.flush()
                if pct >= 100:
                    self.err.write("\n")
            elif pct - self._bar_at >= 10 or pct >= 100:
                self._bar_at = pct
                self._line(f"{stamp} export {pct:5.1f}%")

    def _line(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()


def _summary(record: Record) -> dict[str, Any]:
    state = record.get("state", {})
    return {
        "job_uuid": record["uuid"],
        "image_uuid": record["params"].get("image_uuid"),
        "manifest": state.get("manifest_path"),
        "file": state.get("file_path"),
        "execution": record["execution"],
        "error": record.get("error"),
        "boot_report": record.get("boot_report"),
        "capture": record.get("capture"),
        "verification": record.get("verification"),
    }


def format_capture(capture: dict[str, Any]) -> str:
    """One line: how the prototype was captured and what it cost it."""
    text = f"capture: {clean(str(capture.get('capture')))}"
    if capture.get("consistency"):
        text += f", consistency {clean(str(capture['consistency']))}"
    if isinstance(capture.get("freeze_window_ms"), int | float):
        text += f", filesystems frozen for {capture['freeze_window_ms']:.0f} ms"
    if isinstance(capture.get("downtime_s"), int | float):
        text += f", prototype down for {capture['downtime_s']:.1f} s"
    return text


def format_verification(verification: dict[str, Any] | None) -> str:
    """One line per check: what the verification boot of the image showed."""
    if not verification:
        return "verification: none"
    status = clean(str(verification.get("status")))
    duration = verification.get("duration_s")
    head = f"verification: {status}" + (f" ({duration:.0f} s)" if isinstance(duration, int | float) else "")
    if verification.get("image"):
        head += f"; image {clean(str(verification['image']))}"
    lines = [head]
    for check in verification.get("checks") or []:
        status, name, detail = (clean(str(check.get(k))) for k in ("status", "name", "detail"))
        lines.append(f"  {status:6}  {name:13} {detail}")
    return "\n".join(lines)


def format_boot_report(report: dict[str, Any] | None) -> str:
    if not report:
        return "boot report: none received"
    t = report.get("timeline_ms", {})

    def sec(key: str) -> str:
        value = t.get(key)
        return f"{value / 1000:.2f}s" if isinstance(value, int | float) else "?"

    targets = report.get("targets", {})
    if report.get("clock") == "zone":  # the SMF method's report: whole seconds since the zone booted
        head = ["boot report (time since the zone booted, 1 s resolution):"]
    else:
        head = ["boot report (time since kernel start):", f"  userspace (PID 1) started   {sec('kernel_to_userspace')}"]
    lines = [
        *head,
        f"  operator-script unit start  {sec('unit_start')}",
        f"  script start -> end         {sec('script_start')} -> {sec('script_end')}",
        f"  cleanup done, powering off  {sec('finish')}",
        f"  services up when it ran     {clean(' '.join(report.get('services', []))) or '-'}",
        f"  of those, regular services  {clean(' '.join(report.get('late_services', []))) or 'none'}",
        f"  targets                     {clean(' '.join(f'{k}={v}' for k, v in targets.items()))}",
    ]
    return "\n".join(lines)


# --- commands --------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    config = load_effective_config(args.config).with_overrides(
        libvirt_uri=args.libvirt_uri,
        force_stop=args.force_stop,
        prepare_timeout=args.prepare_timeout,
        boot_timeout=args.boot_timeout,
        shutdown_timeout=args.shutdown_timeout,
        stop_timeout=args.stop_timeout,
        agent_timeout=args.agent_timeout,
        verify_timeout=args.verify_timeout,
    )
    manifest: dict[str, Any] | None = None
    if args.manifest is not None:
        from imgprep.manifest import load_user_manifest

        manifest = load_user_manifest(args.manifest)
    request = build_request(
        config,
        vm=args.vm,
        manifest=manifest,
        name=args.name,
        version=args.image_version,
        script=args.script,
        compression=args.compression,
        output_dir=args.output_dir,
        backend=args.backend,
        host=args.host,
        mode=args.mode,
        strict=args.strict,
        accept_new_host_key=bool(args.accept_new_host_key),
        capture=args.capture,
        consistency=args.consistency,
        disk=args.disk,
        verify=args.verify,
        keep_unverified=args.keep_unverified,
    )
    cancel = CancelToken()
    events = JsonEvents(out) if args.json else HumanEvents(err)
    job = Job(config, request, events=events, cancel=cancel)
    code = EXIT_OK
    with cancel_on_signals(cancel):
        try:
            job.run()  # locate, validate under the VM's lock (bad input: exit 2), run the chain
        except RestoreFailed as exc:
            err.write(f"imgprep: error: {clean(exc.message)}\n")
            code = EXIT_UNRESTORED
        except Cancelled as exc:
            restored = "the VM was restored" if job.record.get("vm_touched") else "nothing was touched"
            err.write(f"imgprep: {clean(exc.message)}; {restored}\n")
            code = EXIT_CANCELED
        except InvalidInput:
            if job.record.get("vm_touched"):
                raise ImgprepError(job.record["error"]["message"]) from None
            raise
        except ImgprepError as exc:
            err.write(f"imgprep: error: {clean(exc.code)}: {clean(exc.message)} (the VM was restored)\n")
            code = EXIT_FAILED
    summary = _summary(job.record)
    if args.json:
        out.write(json.dumps(summary, sort_keys=True) + "\n")
    else:
        if code == EXIT_OK:
            out.write(
                f"image {summary['image_uuid']}\n  file:     {summary['file']}\n  manifest: {summary['manifest']}\n"
            )
        out.write(f"job {summary['job_uuid']}: {summary['execution']}\n")
        if summary["capture"]:
            out.write(format_capture(summary["capture"]) + "\n")
        out.write(format_boot_report(job.record.get("boot_report")) + "\n")
        out.write(format_verification(job.record.get("verification")) + "\n")
    return code


def cmd_jobs(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    config = load_effective_config(args.config).with_overrides(libvirt_uri=getattr(args, "libvirt_uri", None))
    store = JobStore(config.state_dir)
    if args.jobs_command == "get":
        record = store.get(args.job_uuid)
        record["running"] = job_is_running(config, record)
        record["needs_recovery"] = job_needs_recovery(config, record)
        out.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if record.get("boot_report"):
            err.write(format_boot_report(record["boot_report"]) + "\n")
        if record.get("verification"):
            err.write(format_verification(record["verification"]) + "\n")
        return EXIT_OK
    if args.jobs_command == "list":
        rows = []
        for record in store.list_jobs():
            rows.append(
                {
                    "uuid": record["uuid"],
                    "vm": record["params"].get("vm_uuid") or record["params"].get("vm"),
                    "image_uuid": record["params"].get("image_uuid"),
                    "execution": record["execution"],
                    "created_at": record["created_at"],
                    "needs_recovery": job_needs_recovery(config, record),
                }
            )
        if args.json:
            out.write(json.dumps(rows) + "\n")
        else:
            out.write(f"{'JOB':36}  {'VM':36}  {'EXECUTION':10}  {'CREATED':24}  NOTE\n")
            for row in rows:
                note = "NEEDS RECOVERY: imgprep jobs recover " + row["uuid"] if row["needs_recovery"] else ""
                out.write(
                    f"{row['uuid']:36}  {clean(row['vm']):36}  {row['execution']:10}  {row['created_at']:24}  {note}\n"
                )
        return EXIT_OK
    cancel = CancelToken()
    with cancel_on_signals(cancel):
        record = recover(config, args.job_uuid, cancel=cancel)
    last = record.get("recovery", [{}])[-1].get("result")
    if args.json:
        out.write(json.dumps({"job_uuid": record["uuid"], "execution": record["execution"], "recovery": last}) + "\n")
    else:
        out.write(f"job {record['uuid']}: {last}\n")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from imgprep.api import serve

    return serve(load_effective_config(args.config), listen=args.listen, out=out)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    umask = os.umask(UMASK)  # job records, sockets, temporary files: private unless said otherwise
    try:
        return _main(argv, out, err)
    finally:
        os.umask(umask)


def _main(argv: Sequence[str] | None, out: TextIO, err: TextIO) -> int:
    debug = False
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        logging.basicConfig(
            level=logging.DEBUG if debug else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=err,
        )
        if args.command == "create":
            return cmd_create(args, out, err)
        if args.command == "jobs":
            return cmd_jobs(args, out, err)
        return cmd_serve(args, out, err)
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    except InvalidInput as exc:
        err.write(f"imgprep: error: {clean(exc.message)}\n")
        return EXIT_INVALID
    except RestoreFailed as exc:
        err.write(f"imgprep: error: {clean(exc.message)}\n")
        return EXIT_UNRESTORED
    except Cancelled as exc:
        err.write(f"imgprep: {clean(exc.message)}\n")
        return EXIT_CANCELED
    except ImgprepError as exc:
        if debug:
            log.exception("failed")
        err.write(f"imgprep: error: {clean(exc.code)}: {clean(exc.message)}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        err.write("imgprep: interrupted\n")
        return EXIT_CANCELED
    except Exception as exc:  # a bug: one line, the traceback only with --debug
        if debug:
            log.exception("crashed")
        err.write(f"imgprep: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)\n")
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
