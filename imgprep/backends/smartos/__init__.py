"""The SmartOS backend (zones on a compute node over SSH): see ``backend``."""

from imgprep.backends.smartos.backend import SmartosBackend, SmartosState

__all__ = ["SmartosBackend", "SmartosState"]
