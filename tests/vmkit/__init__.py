"""Test-only qemu harness: Debian cloud kernel, TCG guests and real vmcore samples."""

from .cache import cache_dir, file_lock
from .initrd import InitrdError, busybox_tree, compile_static, find_busybox, pack_cpio
from .kernel import Kernel, KernelError, get_debug_vmlinux, get_kernel
from .qemu import Drive, Guest, GuestResult, GuestTimeout, VmError, run_guest
from .sample import Sample, SampleError, elf_core_length, get_sample

__all__ = [
    "Drive",
    "Guest",
    "GuestResult",
    "GuestTimeout",
    "InitrdError",
    "Kernel",
    "KernelError",
    "Sample",
    "SampleError",
    "VmError",
    "busybox_tree",
    "cache_dir",
    "compile_static",
    "elf_core_length",
    "file_lock",
    "find_busybox",
    "get_debug_vmlinux",
    "get_kernel",
    "get_sample",
    "pack_cpio",
    "run_guest",
]
