"""Run a TCG qemu guest with its serial console in a log file, with timeouts and waits."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
# How often wait_for() re-reads the console log. Guest output under TCG arrives in
# bursts of kilobytes; 50 ms keeps latency low without spinning.
POLL_INTERVAL = 0.05
# Lines of console quoted in error messages: enough to show a panic and its cause.
TAIL_LINES = 40


class VmError(RuntimeError):
    """A guest failed; the message ends with the tail of its console log."""

    def __init__(self, message: str, console: str = "", log_path: Path | None = None) -> None:
        self.console = console
        self.log_path = log_path
        tail = "\n".join(console.splitlines()[-TAIL_LINES:])
        where = f" (console log: {log_path})" if log_path else ""
        super().__init__(f"{message}{where}\n--- last console lines ---\n{tail}")


class GuestTimeout(VmError):
    """The guest did not finish (or print the awaited line) in time and was killed."""


@dataclass(frozen=True)
class Drive:
    """A virtio disk backed by a host file."""

    path: Path
    format: str = "raw"
    readonly: bool = False

    def arg(self) -> str:
        # qemu option values escape a literal comma by doubling it.
        path = str(self.path).replace(",", ",,")
        ro = ",readonly=on" if self.readonly else ""
        return f"file={path},format={self.format},if=virtio,cache=unsafe{ro}"


@dataclass(frozen=True)
class GuestResult:
    """How a guest ended: qemu's exit code (None if killed), console text, wall time."""

    returncode: int | None
    console: str
    timed_out: bool
    elapsed: float
    log_path: Path


class Guest:
    """One qemu process. Use as a context manager so it is killed on any error.

    The serial console (ttyS0) goes to *log_path*; qemu's own stderr goes to
    ``<log_path>.qemu-stderr``. ``-no-reboot`` makes a guest reboot or panic end qemu.
    """

    def __init__(
        self,
        kernel: Path,
        initrd: Path,
        append: str,
        log_path: Path,
        *,
        mem_mib: int = 512,
        drives: Sequence[Drive | Path] = (),
        net: bool = False,
        smp: int = 1,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.log_path = Path(log_path)
        self.args = [
            QEMU,
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-nographic",
            "-no-reboot",
            "-monitor",
            "none",
            "-serial",
            f"file:{self.log_path}",
            "-m",
            str(mem_mib),
            "-smp",
            str(smp),
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            append,
        ]
        for d in drives:
            drive = d if isinstance(d, Drive) else Drive(Path(d))
            self.args += ["-drive", drive.arg()]
        self.args += ["-nic", "user,model=virtio-net-pci" if net else "none"]
        self.args += list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._offset = 0
        self._text = ""

    def start(self) -> Guest:
        if shutil.which(QEMU) is None:
            raise VmError(f"{QEMU} not found (apt-get install qemu-system-x86)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_bytes(b"")
        log.info("starting guest: %s", " ".join(self.args))
        self._started = time.monotonic()
        with open(f"{self.log_path}.qemu-stderr", "wb") as err:
            self._proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )
        return self

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("guest not started")
        return self._proc

    def console(self) -> str:
        """Console text so far (read incrementally; the guest may still be writing)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return self._text
        self._offset += len(chunk)
        self._text += chunk.decode("utf-8", "replace").replace("\r\n", "\n")
        return self._text

    def qemu_stderr(self) -> str:
        try:
            return Path(f"{self.log_path}.qemu-stderr").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _console_with_stderr(self) -> str:
        err = self.qemu_stderr().strip()
        return self.console() + (f"\n--- qemu stderr ---\n{err}" if err else "")

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Poll the console until *pattern* (a regex) matches; return the match.

        Raises GuestTimeout (after killing the guest) when *timeout* seconds pass, and
        VmError when qemu exits before the line appears. While the guest runs, only
        complete lines are searched: a line still being written to the serial log
        ("VMKIT-HELLO 6.1." of "6.1.0-57-cloud-amd64") must not match half-way.
        """
        regex = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.console()
            m = regex.search(text[: text.rfind("\n") + 1])
            if m:
                return m
            if self.proc.poll() is not None:
                m = regex.search(self.console())  # output written just before exit
                if m:
                    return m
                raise VmError(
                    f"guest exited (code {self.proc.returncode}) before printing {regex.pattern!r}",
                    self._console_with_stderr(),
                    self.log_path,
                )
            if time.monotonic() > deadline:
                self.kill()
                raise GuestTimeout(
                    f"no console line matching {regex.pattern!r} within {timeout:.0f} s",
                    self._console_with_stderr(),
                    self.log_path,
                )
            time.sleep(POLL_INTERVAL)

    def wait(self, timeout: float) -> GuestResult:
        """Wait for qemu to exit; on timeout kill it and return ``timed_out=True``."""
        timed_out = False
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
        return GuestResult(
            returncode=None if timed_out else self.proc.returncode,
            console=self._console_with_stderr(),
            timed_out=timed_out,
            elapsed=time.monotonic() - self._started,
            log_path=self.log_path,
        )

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            log.info("killing guest pid %d", self._proc.pid)
            self._proc.kill()
            self._proc.wait()


def run_guest(
    kernel: Path,
    initrd: Path,
    append: str,
    log_path: Path,
    *,
    timeout: float,
    mem_mib: int = 512,
    drives: Sequence[Drive | Path] = (),
    net: bool = False,
    extra_args: Sequence[str] = (),
) -> GuestResult:
    """Boot a guest and wait for qemu to exit (killed after *timeout* seconds)."""
    guest = Guest(
        kernel,
        initrd,
        append,
        log_path,
        mem_mib=mem_mib,
        drives=drives,
        net=net,
        extra_args=extra_args,
    )
    with guest:
        return guest.wait(timeout)
