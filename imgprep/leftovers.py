"""The last check before publishing a libvirt image: nothing of imgprep is left in it.

The guest reports ``success`` itself, and a guest that lies (its owner controls it)
could skip the runner's cleanup and have the armed unit and the operator script
exported into the image. So, once the guest is off and before export, the disks are
opened read-only with libguestfs and every path imgprep injected is looked for, as
the SmartOS backend checks the zone root.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from imgprep.errors import ImgprepError
from imgprep.libguestfs import Guest, open_guest


class LeftoversFound(ImgprepError):
    code = "PrepareImageError"


def present(guest: Guest, paths: Sequence[str]) -> list[str]:
    """The guest paths of ``paths`` that exist (a dangling symlink counts)."""
    return [p for p in paths if guest.exists(p)]


def check_clean(disks: Sequence[tuple[Path, str]], paths: Sequence[str], *, force_tcg: bool) -> None:
    """Raise ``LeftoversFound`` if any of ``paths`` is on the powered-off guest's disks."""
    with open_guest(disks, readonly=True, force_tcg=force_tcg) as guest:
        found = present(guest, paths)
    if found:
        raise LeftoversFound(
            f"the prepare boot left imgprep files in the guest: {', '.join(found)}; not imaging it "
            "(the guest reported success without the cleanup)"
        )
