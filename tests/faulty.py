"""Test-only crash dump sources that fail the way /proc/vmcore and /dev/oldmem can.

They subclass Vmcore and override its one read primitive, ``_pread_into``; the engine's own
retry and salvage logic runs unchanged on top. Nothing here is imported by production code.
"""

from __future__ import annotations

import errno

from kdump_capture.vmcore import Vmcore


def adopt(vm: Vmcore, cls: type[Vmcore], **attrs) -> Vmcore:
    """A ``cls`` instance sharing ``vm``'s open file and parsed headers."""
    out = cls.__new__(cls)
    out.__dict__.update(vars(vm))
    for k, v in attrs.items():
        setattr(out, k, v)
    return out


class EioVmcore(Vmcore):
    """Reads touching one of ``bad`` (``[start, end)`` source offsets) fail with EIO.

    A read that starts before a bad range returns the bytes up to it (a short read), as the
    kernel does; a read that starts inside one fails. With ``transient`` each range fails
    only on its first read and reads fine afterwards.
    """

    bad: list[tuple[int, int]] = []
    transient = False
    failures = 0

    def _pread_into(self, view, offset):
        end = offset + len(view)
        for i, (a, b) in enumerate(self.bad):
            if a <= offset < b:
                self.failures += 1
                if self.transient:
                    self.bad = self.bad[:i] + self.bad[i + 1 :]
                raise OSError(errno.EIO, "Input/output error")
            if offset < a < end:
                view = view[: a - offset]
                end = a
        return super()._pread_into(view, offset)


class ShortVmcore(Vmcore):
    """The source ends at ``end`` although its size says more (a device that stops early)."""

    end = 0

    def _pread_into(self, view, offset):
        if offset >= self.end:
            return 0
        return super()._pread_into(view[: self.end - offset], offset)
