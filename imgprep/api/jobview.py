"""What of a job record each API caller may see.

A job record holds the operator's view of a job: hypervisor URIs, SSH targets, host
paths, the guest's log tail and boot report. Only a caller with the token and no
``account`` (the operator, or IMGAPI acting for itself) gets it whole. A caller
acting for an account sees only that account's jobs, and the ``public`` view of
them; so does the unauthenticated workflow poll (``GET /jobs/:uuid``), which needs
no more to follow a job to its end.
"""

from __future__ import annotations

from typing import Any

from imgprep.jobstore import Record

_RESULT_KEYS = ("name", "result", "started_at", "finished_at")


def job_owner(record: Record) -> str | None:
    """The account the image is created for (the manifest's owner), if any."""
    manifest = record.get("params", {}).get("manifest") or {}
    owner = manifest.get("owner")
    return owner if isinstance(owner, str) else None


def _error(error: Any) -> dict[str, Any] | None:
    if not isinstance(error, dict):
        return None
    return {"code": error.get("code"), "message": error.get("message")}


def _results(results: Any) -> list[dict[str, Any]]:
    if not isinstance(results, list):
        return []
    return [
        {**{k: r.get(k) for k in _RESULT_KEYS}, "error": _error(r.get("error"))} for r in results if isinstance(r, dict)
    ]


def public(record: Record) -> dict[str, Any]:
    """A node-workflow job with what a workflow client reads: states, step names, errors."""
    params = record.get("params", {})
    return {
        "uuid": record.get("uuid"),
        "name": record.get("name"),
        "execution": record.get("execution"),
        "created_at": record.get("created_at"),
        "params": {"image_uuid": params.get("image_uuid"), "vm_uuid": params.get("vm_uuid")},
        "chain": [{"name": s.get("name")} for s in record.get("chain", []) if isinstance(s, dict)],
        "onerror": [{"name": s.get("name")} for s in record.get("onerror", []) if isinstance(s, dict)],
        "always": [{"name": s.get("name")} for s in record.get("always", []) if isinstance(s, dict)],
        "chain_results": _results(record.get("chain_results")),
        "onerror_results": _results(record.get("onerror_results")),
        "always_results": _results(record.get("always_results")),
        "error": _error(record.get("error")),
    }
