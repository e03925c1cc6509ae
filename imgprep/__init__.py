"""imgprep: turn a running prototype VM into a clean, reusable image."""

__version__ = "0.1.0"
