"""The IMGAPI-compatible HTTP job API (``imgprep serve``).

Modules by concern: ``server`` (start and stop), ``routes`` (HTTP shapes),
``service`` (what the endpoints do), ``queue`` (worker pool, per-VM refusal,
restart recovery), ``auth`` (listen address and token), ``files`` (serving image
files), ``errors`` (IMGAPI error bodies).
"""

from imgprep.api.server import serve

__all__ = ["serve"]
