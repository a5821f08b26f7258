"""Loading the capture kernel: its command line, kexec_file_load(2), and the kexec fallback.

kexec_file_load with KEXEC_FILE_ON_CRASH lets the kernel verify and place the image itself;
where the call is unavailable, the ``kexec`` binary runs with KEXEC_OPTIONS.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import struct

from ..errors import LoadError

log = logging.getLogger(__name__)

SYS_KEXEC_FILE_LOAD = 320  # x86_64
KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_ON_CRASH = 0x2
KEXEC_FILE_NO_INITRAMFS = 0x4

# Options of the running kernel's command line that must not reach the capture kernel:
# the reservation itself, the root and resume devices and init programs of the production
# system (the capture kernel runs our initramfs), CPU and memory limits we set ourselves,
# and huge-page/CMA reservations that the small capture memory cannot hold.
DROP_OPTIONS = frozenset(
    {
        "crashkernel",
        "root",
        "rootflags",
        "rootfstype",
        "ro",
        "rw",
        "resume",
        "resume_offset",
        "init",
        "rdinit",
        "initrd",
        "BOOT_IMAGE",
        "nr_cpus",
        "maxcpus",
        "mem",
        "hugepages",
        "hugepagesz",
        "default_hugepagesz",
        "hugetlb_cma",
        "cma",
        "kexec_jump_back_entry",
    }
)
DROP_PREFIXES = ("rd.", "systemd.", "kdump_capture.")

# What a capture kernel needs (as RHEL and SUSE add them): reset devices left running by
# the crashed kernel, poll interrupts that may never arrive, no memory cgroup / NUMA / THP
# bookkeeping in a tiny reservation, no device-dump areas, and reboot 10 s after a panic
# of the capture kernel itself instead of hanging.
CAPTURE_OPTIONS = (
    "irqpoll",
    "reset_devices",
    "cgroup_disable=memory",
    "mce=off",
    "numa=off",
    "acpi_no_memhotplug",
    "transparent_hugepage=never",
    "novmcoredd",
    "cma=0",
    "hugetlb_cma=0",
    "panic=10",
)


def _key(option: str) -> str:
    """The parameter's name; a word in double quotes as a whole ("rdinit=/x") is the same
    parameter to the kernel, which drops the opening quote (lib/cmdline.c next_arg)."""
    return option.removeprefix('"').split("=", 1)[0]


def kernel_words(text: str, strict: bool = True) -> list[str]:
    """Split a kernel command line the way the kernel does (lib/cmdline.c next_arg).

    Blanks separate options except inside double quotes, which stay in the option (they
    are the kernel's to remove); single quotes mean nothing to the kernel. An unbalanced
    double quote raises ValueError when ``strict`` (a value from our configuration), and
    runs to the end of the line as the kernel takes it otherwise (/proc/cmdline).
    """
    words: list[str] = []
    word: list[str] = []
    quoted_at = -1
    for i, ch in enumerate(text):
        if ch == '"':
            quoted_at = -1 if quoted_at >= 0 else i
        if ch.isspace() and quoted_at < 0:
            if word:
                words.append("".join(word))
                word = []
            continue
        word.append(ch)
    if quoted_at >= 0 and strict:
        raise ValueError(f'unbalanced double quote (the " at character {quoted_at + 1})')
    if word:
        words.append("".join(word))
    return words


def kexec_words(options: str) -> list[str]:
    """KEXEC_OPTIONS as argv words (shell quoting); ValueError for an unbalanced quote."""
    try:
        return shlex.split(options)
    except ValueError:
        raise ValueError("unbalanced quote") from None


def capture_cmdline(proc_cmdline: str, commandline: str, append: str, cpus: int = 1) -> str:
    """The capture kernel's command line (pure).

    Base: KDUMP_COMMANDLINE when set (taken as written), else the running kernel's command
    line without the options in DROP_OPTIONS/DROP_PREFIXES. Then ``nr_cpus`` (KDUMP_CPUS;
    0 = no limit) and CAPTURE_OPTIONS, each only if the base or KDUMP_COMMANDLINE_APPEND
    does not set it already, then KDUMP_COMMANDLINE_APPEND last (the kernel takes the last
    value of a repeated option). Raises ValueError for an unbalanced double quote in
    ``commandline`` or ``append``.
    """
    if commandline.strip():
        base = kernel_words(commandline)
    else:
        words = kernel_words(proc_cmdline, strict=False)
        if "--" in words:  # arguments for the production system's init: not ours
            words = words[: words.index("--")]
        base = [
            o
            for o in words
            if _key(o) not in DROP_OPTIONS and not _key(o).startswith(DROP_PREFIXES)
        ]
    tail = kernel_words(append)
    given = {_key(o) for o in base + tail}
    extra = [f"nr_cpus={cpus}"] if cpus > 0 else []
    extra += CAPTURE_OPTIONS
    extra = [o for o in extra if _key(o) not in given]
    # "--" ends kernel options: everything after it goes to init; ours must precede it.
    if "--" in base:
        i = base.index("--")
        base, init_args = base[:i], base[i:]
    else:
        init_args = []
    return " ".join(base + extra + tail + init_args)


# ------------------------------------------------------------------ kexec


def kexec_file_load(kernel: str, initrd: str, cmdline: str, flags: int) -> None:
    """The kexec_file_load(2) system call; raises OSError with the kernel's errno."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    kfd = os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ifd = os.open(initrd, os.O_RDONLY | os.O_CLOEXEC)
        try:
            arg = cmdline.encode() + b"\0"
            rc = libc.syscall(
                ctypes.c_long(SYS_KEXEC_FILE_LOAD),
                ctypes.c_int(kfd),
                ctypes.c_int(ifd),
                ctypes.c_ulong(len(arg)),
                ctypes.c_char_p(arg),
                ctypes.c_ulong(flags),
            )
            if rc != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
        finally:
            os.close(ifd)
    finally:
        os.close(kfd)


def kexec_file_unload() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(
        ctypes.c_long(SYS_KEXEC_FILE_LOAD),
        ctypes.c_int(-1),
        ctypes.c_int(-1),
        ctypes.c_ulong(0),
        ctypes.c_char_p(None),
        ctypes.c_ulong(KEXEC_FILE_UNLOAD | KEXEC_FILE_ON_CRASH),
    )
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def kexec_binary_argv(
    kexec: str, kernel: str, initrd: str, cmdline: str, options: str
) -> list[str]:
    """The fallback command: ``kexec -p`` with KEXEC_OPTIONS (pure)."""
    return [
        kexec,
        "-p",
        *kexec_words(options),
        f"--initrd={initrd}",
        f"--command-line={cmdline}",
        kernel,
    ]


# Errors of kexec_file_load after which the kexec binary may still succeed: the call does
# not exist or is refused for this image format/kernel, as opposed to a problem the binary
# would hit too (no reservation, image too large for it).
FALLBACK_ERRNOS = {errno.ENOSYS, errno.ENOEXEC, errno.EKEYREJECTED, errno.EPERM}

_TOO_LARGE = (
    "the capture kernel and initramfs do not fit the crashkernel reservation "
    "(see 'kdump-capture estimate')"
)
_SIGNATURE = (
    "the kernel does not trust the capture kernel's signature (with Secure Boot or "
    "CONFIG_KEXEC_SIG_FORCE it loads only kernels signed by a key it trusts)"
)
# What each errno of kexec_file_load(2) means for a crash load, said in words: the bare
# strerror ("Cannot assign requested address") tells an administrator nothing.
LOAD_ERRORS = {
    errno.EPERM: (
        "not permitted: loading a kernel needs CAP_SYS_BOOT, and a kernel locked down "
        "(Secure Boot) loads only a capture kernel signed by a key it trusts"
    ),
    errno.EKEYREJECTED: _SIGNATURE,
    errno.EBADMSG: _SIGNATURE,
    errno.ENOKEY: _SIGNATURE,
    errno.ENODATA: _SIGNATURE,  # no signature at all (KEXEC_SIG_FORCE)
    errno.ENOEXEC: (
        "the capture kernel is not an image this kernel can load (another architecture, "
        "or not a bzImage; KDUMP_KERNELVER names it)"
    ),
    errno.EBUSY: "another kexec load or unload is in progress: try again",
    errno.EADDRNOTAVAIL: _TOO_LARGE,
    errno.ENOMEM: _TOO_LARGE,
    errno.EINVAL: (
        "the kernel refused the arguments (a capture command line longer than the "
        "capture kernel takes?)"
    ),
    errno.ENOSYS: "this kernel has no kexec_file_load",
}


def load_error(e: OSError) -> str:
    """``strerror: what it means`` for an error of kexec_file_load (pure)."""
    meaning = LOAD_ERRORS.get(e.errno or 0)
    return f"{e.strerror}: {meaning}" if meaning else str(e.strerror)


# The x86 boot protocol header of a bzImage (Documentation/arch/x86/boot.rst): the magic
# "HdrS" at 0x202 and the protocol version after it; init_size at 0x260 (protocol 2.10+).
BZ_MAGIC_AT = 0x202
BZ_MAGIC = struct.Struct("<4sH")
BZ_INIT_SIZE_AT = 0x260
BZ_INIT_SIZE = struct.Struct("<I")


def kernel_footprint(path: str) -> int:
    """Bytes of the reservation the kernel takes once loaded: a bzImage's init_size (what
    kexec_file_load places for it to decompress and run in place: 51 MiB for a 13.5 MiB
    Debian kernel), otherwise its file size. 0 when it cannot be read."""
    try:
        with open(path, "rb") as f:
            head = f.read(BZ_INIT_SIZE_AT + BZ_INIT_SIZE.size)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return 0
    if len(head) == BZ_INIT_SIZE_AT + BZ_INIT_SIZE.size:
        magic, version = BZ_MAGIC.unpack_from(head, BZ_MAGIC_AT)
        if magic == b"HdrS" and version >= 0x20A:
            return max(size, BZ_INIT_SIZE.unpack_from(head, BZ_INIT_SIZE_AT)[0])
    return size


# The setup header's kernel_version (protocol 2.00+): a pointer, less 0x200, to the NUL-ended
# string that ``uname -r`` prints first ("6.1.0-18-amd64 (debian-kernel@...) #1 SMP ...").
BZ_VERSION_PTR_AT = 0x20E
BZ_VERSION_PTR = struct.Struct("<H")
BZ_VERSION_MAX = 256  # the string is one line; the kernel's own buffer is this size too


def image_release(path: str) -> str:
    """The release (``uname -r``) of a kernel image file, or "" when it does not say: read
    from a bzImage's header, else from the name of the file its links lead to
    (``vmlinuz-VER``, ``Image-VER``, ``vmlinux-VER``) or of its directory
    (``/usr/lib/modules/VER/vmlinuz``, Fedora's and RHEL 9's layout)."""
    real = os.path.realpath(path)
    try:
        with open(real, "rb") as f:
            head = f.read(BZ_VERSION_PTR_AT + BZ_VERSION_PTR.size)
            if len(head) == BZ_VERSION_PTR_AT + BZ_VERSION_PTR.size:
                magic, _version = BZ_MAGIC.unpack_from(head, BZ_MAGIC_AT)
                (ptr,) = BZ_VERSION_PTR.unpack_from(head, BZ_VERSION_PTR_AT)
                if magic == b"HdrS" and ptr:
                    f.seek(ptr + 0x200)
                    words = f.read(BZ_VERSION_MAX).partition(b"\0")[0].split()
                    if words and words[0].isascii():
                        return words[0].decode("ascii")
    except OSError:
        pass
    name = os.path.basename(real)
    for prefix in ("vmlinuz-", "Image-", "vmlinux-"):
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix) :]
    parent = os.path.dirname(real)
    if os.path.basename(os.path.dirname(parent)) == "modules":
        return os.path.basename(parent)
    return ""


def fit_problem(kernel: str, initrd: str, reserved: int) -> str | None:
    """Why ``kernel`` and ``initrd`` cannot fit a reservation of ``reserved`` bytes, or None.

    A lower bound (the kernel also places its purgatory, boot parameters and the ELF
    headers there): past it the load can only fail, and the kernel frees the loaded capture
    kernel before it tries, so ``load`` checks it first.
    """
    try:
        image = os.path.getsize(initrd)
    except OSError:
        return None  # the load names the missing file
    loaded = kernel_footprint(kernel)
    need = loaded + image
    if need <= reserved:
        return None
    mib = 1 << 20
    return (
        f"the capture kernel {kernel} ({loaded / mib:.1f} MiB once loaded) "
        f"and the initramfs {initrd} ({image / mib:.1f} MiB) need at least "
        f"{need / mib:.1f} MiB, more than the crashkernel reservation "
        f"({reserved / mib:.0f} MiB): raise crashkernel= (see 'kdump-capture estimate')"
    )


def load_image(kernel: str, initrd: str, cmdline: str, kexec_options: str) -> str:
    """Load the capture kernel; returns how ("kexec_file_load" or the kexec command)."""
    try:
        kexec_file_load(kernel, initrd, cmdline, KEXEC_FILE_ON_CRASH)
        return "kexec_file_load"
    except OSError as e:
        first = e
    import shutil  # here, not at the top: a save validates the options with this module
    import subprocess

    kexec = shutil.which("kexec")
    if first.errno not in FALLBACK_ERRNOS or kexec is None:
        raise LoadError(f"kexec_file_load failed: {load_error(first)}") from None
    argv = kexec_binary_argv(kexec, kernel, initrd, cmdline, kexec_options)
    log.info("kexec_file_load failed (%s); trying %s", first.strerror, shlex.join(argv))
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise LoadError(
            f"kexec_file_load failed ({load_error(first)}) and {kexec} failed: {r.stderr.strip()}"
        )
    return shlex.join(argv)


def load_command(how: str, kernel: str, initrd: str, cmdline: str) -> str:
    """The load as one line: the kexec command when the binary loaded it, else the call."""
    if how != "kexec_file_load":
        return how  # load_image returns the kexec binary's command line
    return (
        f"kexec_file_load kernel={shlex.quote(kernel)} initrd={shlex.quote(initrd)} "
        f"cmdline={shlex.quote(cmdline)} flags=KEXEC_FILE_ON_CRASH"
    )


# KDUMP_VERBOSE bits that SUSE's loader honours: the load command line to syslog, and to stdout.
VERBOSE_SYSLOG = 1
VERBOSE_STDOUT = 4
SYSLOG_SOCKET = "/dev/log"
KMSG = "/dev/kmsg"
# syslog priority: facility user (1 << 3) | severity notice (5)
SYSLOG_PRI = 13


def announce_load(line: str, verbose: int, socket_path: str = SYSLOG_SOCKET, kmsg: str = KMSG):
    """Report the load command line as KDUMP_VERBOSE asks (SUSE: bits 1 and 4 on load).

    Bit 4 prints it; bit 1 sends it to syslog through ``socket_path``, or when no syslog
    listens there (early boot, a minimal or capture system) to the kernel log via ``kmsg``.
    Logging is best effort: it never stops a load.
    """
    if verbose & VERBOSE_STDOUT:
        print(f"load command: {line}", flush=True)
    if not verbose & VERBOSE_SYSLOG:
        return
    import socket

    msg = f"kdump-capture[{os.getpid()}]: load command: {line}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(socket_path)
            s.send(f"<{SYSLOG_PRI}>{msg}".encode())
        return
    except OSError as e:
        log.debug("syslog at %s: %s; using %s", socket_path, e.strerror, kmsg)
    try:
        fd = os.open(kmsg, os.O_WRONLY | os.O_CLOEXEC)
        try:
            # /dev/kmsg takes one record per write, at most 1 KiB of it shown (LOG_LINE_MAX)
            os.write(fd, f"<{SYSLOG_PRI}>{msg}\n".encode()[:1024])
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("cannot log the load command to syslog or %s: %s", kmsg, e.strerror)
