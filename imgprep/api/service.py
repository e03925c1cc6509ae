"""What the endpoints do, free of HTTP: create, list, get and delete images; read jobs.

Every method is synchronous (SQLite, libvirt, SSH); the routes call them in a worker thread.

The backend of a create is the server's (``serve.backend``): IMGAPI clients cannot say
which. With ``smartos``, the backend's ``locate`` looks for the VM on the configured
compute nodes (``serve.hosts``, else every entry of ``hosts:``), in order: the first
node that has the VM gets the job (docs/api.md).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from imgprep.api import jobview
from imgprep.api.errors import ApiError, invalid_parameter, not_found
from imgprep.api.files import ContentMd5Cache, confined
from imgprep.api.queue import JobQueue, LogEvents
from imgprep.config import Config
from imgprep.errors import InvalidInput
from imgprep.jobs import Job, build_request, job_is_running
from imgprep.jobstore import JobStore, Record
from imgprep.uuids import CANONICAL_RE

log = logging.getLogger(__name__)
UUID_RE = CANONICAL_RE  # lowercase only: one spelling per image and job
IMAGE_STATES = ("active", "creating", "failed", "disabled", "unactivated", "all")
EXECUTIONS = ("queued", "running", "succeeded", "failed", "canceled")
TASKS = ("create-from-vm", "import-remote-image")
MAX_LIMIT = 1000


def compute_nodes(config: Config) -> tuple[str, ...]:
    """The configured compute nodes a smartos server looks for VMs on, in order."""
    names = config.serve.hosts or tuple(config.hosts)
    unknown = [name for name in names if name not in config.hosts]
    if unknown:
        raise InvalidInput(f"serve.hosts: {', '.join(unknown)}: not configured in hosts:")
    if not names:
        raise InvalidInput("serve.backend smartos needs at least one compute node in hosts:")
    return names


@dataclasses.dataclass(frozen=True)
class ImageFilter:
    state: str = "active"
    name: str | None = None
    version: str | None = None
    owner: str | None = None
    os: str | None = None
    type: str | None = None
    public: bool | None = None
    account: str | None = None
    limit: int = MAX_LIMIT
    marker: str | None = None


def _text_matches(value: Any, wanted: str | None) -> bool:
    if wanted is None:
        return True
    if wanted.startswith("~"):
        return isinstance(value, str) and wanted[1:] in value
    return bool(value == wanted)


def visible_to(manifest: Record, account: str | None) -> bool:
    """IMGAPI's rule: one's own images, and active images that are public or list one in their ACL."""
    if account is None:
        return True
    if manifest.get("owner") == account:
        return True
    return manifest.get("state") == "active" and (
        bool(manifest.get("public")) or account in (manifest.get("acl") or [])
    )


@dataclasses.dataclass
class Service:
    config: Config
    store: JobStore
    queue: JobQueue
    image_dir: Path
    md5: ContentMd5Cache

    # --- create -----------------------------------------------------------------

    def create_from_vm(self, vm_uuid: str, manifest: dict[str, Any], host: str | None = None) -> Record:
        """Validate everything (nothing touched), save the job as queued; return its record.

        ``host`` (imgprep's own parameter, smartos only) narrows the search to one of the
        configured compute nodes; it can never name any other machine.
        """
        self.queue.refuse_if_busy(vm_uuid)
        backend = self.config.serve.backend
        if backend == "smartos":
            nodes = compute_nodes(self.config)
            if host is not None and host not in nodes:
                raise invalid_parameter("host", f"host {host!r} is not one of this server's compute nodes")
        elif host is not None:
            raise invalid_parameter("host", f"this server's backend is {backend}; 'host' applies to smartos only")
        # no host: the backend looks for the VM on the configured compute nodes (locate)
        request = build_request(self.config, vm=vm_uuid, manifest=manifest, output_dir=self.image_dir, backend=backend,
                                host=host, require_host=False)  # fmt: skip
        job = Job(self.config, request, store=self.store, events=LogEvents())
        try:
            job.validate()
            self.queue.submit(job)
        except BaseException:
            job.close()
            raise
        return job.record

    def precompute_md5(self, record: Record) -> None:
        """After a success: compute the Content-MD5 now, not during the first download."""
        path = confined(self.image_dir, record["state"].get("file_path"))
        if path is not None:
            self.md5.get(path)

    # --- images -----------------------------------------------------------------

    def _image(self, image_uuid: str, account: str | None) -> tuple[Record, str | None, str]:
        if not UUID_RE.match(image_uuid):
            raise not_found(f"image {image_uuid!r} not found")
        try:
            manifest, file_path, job_uuid = self.store.get_image(image_uuid.lower())
        except InvalidInput:
            raise not_found(f"image {image_uuid} not found") from None
        if not visible_to(manifest, account):
            raise not_found(f"image {image_uuid} not found")
        return manifest, file_path, job_uuid

    def get_image(self, image_uuid: str, account: str | None) -> Record:
        return self._image(image_uuid, account)[0]

    def list_images(self, query: ImageFilter) -> list[Record]:
        images = self.store.list_images()
        if query.marker is not None:
            index = next((i for i, m in enumerate(images) if m.get("uuid") == query.marker), None)
            if index is None:
                raise invalid_parameter("marker", f"marker image {query.marker} not found")
            images = images[index:]
        selected = []
        for manifest in images:
            if query.state != "all" and manifest.get("state") != query.state:
                continue
            if not visible_to(manifest, query.account):
                continue
            if not (
                _text_matches(manifest.get("name"), query.name)
                and _text_matches(manifest.get("version"), query.version)
            ):
                continue
            if query.owner is not None and manifest.get("owner") != query.owner:
                continue
            if query.os is not None and manifest.get("os") != query.os:
                continue
            if query.type is not None and manifest.get("type") != query.type:
                continue
            if query.public is not None and bool(manifest.get("public")) != query.public:
                continue
            selected.append(manifest)
            if len(selected) >= query.limit:
                break
        return selected

    def image_file(self, image_uuid: str, account: str | None) -> tuple[Path, Record]:
        manifest, file_path, _ = self._image(image_uuid, account)
        if manifest.get("state") != "active" or not manifest.get("files"):
            raise not_found(f"image {image_uuid} has no file (state: {manifest.get('state')})")
        path = confined(self.image_dir, file_path)
        if path is None:
            log.error("image %s: file %s is missing or outside %s", image_uuid, file_path, self.image_dir)
            raise not_found(f"image {image_uuid}: its file is not available")
        return path, manifest

    def delete_image(self, image_uuid: str, account: str | None) -> None:
        manifest, file_path, job_uuid = self._image(image_uuid, account)
        if account is not None and manifest.get("owner") != account:
            raise ApiError(422, "NotImageOwner", f"account {account} does not own image {image_uuid}")
        if manifest.get("state") == "creating" and self._job_active(job_uuid):
            raise ApiError(
                409, "ImageBusy", f"image {image_uuid} is being created by job {job_uuid}; wait for it to finish"
            )
        path = confined(self.image_dir, file_path)
        if path is not None:
            self.md5.forget(path)
            sidecar = path.parent / f"{manifest['uuid']}.imgmanifest"
            path.unlink(missing_ok=True)
            if sidecar.parent.resolve().is_relative_to(self.image_dir.resolve()):
                sidecar.unlink(missing_ok=True)
        self.store.delete_image(manifest["uuid"])
        log.info("image %s deleted", image_uuid)

    def _job_active(self, job_uuid: str) -> bool:
        if self.queue.has_job(job_uuid):
            return True
        try:
            return job_is_running(self.config, self.store.get(job_uuid))
        except InvalidInput:
            return False

    # --- jobs -------------------------------------------------------------------

    def get_job(self, job_uuid: str, account: str | None = None, *, full: bool = True) -> Record:
        """The record whole (``full``, no ``account``: the operator), else its public view;
        a job of another account is not found."""
        if not UUID_RE.match(job_uuid):
            raise not_found(f"job {job_uuid!r} not found")
        try:
            record = self.store.get(job_uuid)
        except InvalidInput:
            raise not_found(f"job {job_uuid} not found") from None
        if account is not None and jobview.job_owner(record) != account:
            raise not_found(f"job {job_uuid} not found")
        return record if full and account is None else jobview.public(record)

    def image_jobs(self, image_uuid: str, account: str | None, task: str | None, execution: str | None) -> list[Record]:
        manifest = self.get_image(image_uuid, account)
        if task is not None and task != "create-from-vm":
            return []  # imgprep only runs create-from-vm jobs
        jobs = [
            job
            for job in self.store.list_jobs()
            if job["params"].get("image_uuid") == manifest["uuid"] and execution in (None, job["execution"])
        ]
        if account is None:
            return jobs
        # seeing a public image does not show its owner's jobs; one's own, only their public view
        return [jobview.public(job) for job in jobs if jobview.job_owner(job) == account]
