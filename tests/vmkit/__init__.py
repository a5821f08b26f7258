"""Test-only qemu harness: Debian cloud kernel, TCG guests and real vmcore samples."""

from .cache import cache_dir, file_lock
from .kernel import Kernel, get_debug_vmlinux, get_kernel
from .qemu import Drive, Guest, GuestResult, GuestTimeout, VmError, run_guest

__all__ = [
    "Drive",
    "Guest",
    "GuestResult",
    "GuestTimeout",
    "Kernel",
    "Sample",
    "SampleError",
    "VmError",
    "cache_dir",
    "file_lock",
    "get_debug_vmlinux",
    "get_kernel",
    "get_sample",
    "run_guest",
]
from .sample import Sample, SampleError, get_sample
