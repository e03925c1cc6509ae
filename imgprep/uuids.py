"""UUIDs as imgprep accepts them: the canonical lowercase 8-4-4-4-12 form only.

``uuid.UUID`` also takes ``urn:uuid:{...}``, braces, upper case and no hyphens; a
manifest UUID in any of those forms named an image that lookups by the canonical
form could not find (and slipped past the duplicate check). One spelling, one image.
"""

from __future__ import annotations

import re

CANONICAL_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def is_canonical(value: object) -> bool:
    """Is ``value`` a string holding a UUID in canonical lowercase form?"""
    return isinstance(value, str) and CANONICAL_RE.fullmatch(value) is not None
