"""Benchmarks of imgprep on the real libvirt test guest (run as root; see docs/benchmark.md)."""
