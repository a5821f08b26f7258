"""Write one dump with our format writer alone (no checksum, dmesg or manifest).

    python3 -S bench/writer.py VMCORE FORMAT LEVEL OUTPUT

What bench/run.py times against makedumpfile, which also writes just the dump file. It
imports only what the writer needs, as ``kdump-capture save`` does for this part.
"""

from __future__ import annotations

import sys


class FileSink:
    """A plain seekable local file (the save command's FileSink also hashes and fsyncs),
    written in the same pieces as that one (kdump_capture.memory.write_piece)."""

    seekable = True

    def __init__(self, path: str) -> None:
        from kdump_capture.memory import write_piece

        self.f = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in main
        self.piece = write_piece()

    def write(self, data) -> None:
        view = memoryview(data)
        while view:
            view = view[self.f.write(view[: self.piece]) :]

    def seek(self, offset: int) -> None:
        self.f.seek(offset)

    def tell(self) -> int:
        return self.f.tell()


def main(argv: list[str]) -> int:
    from kdump_capture.formats import NullMonitor, make_writer
    from kdump_capture.vmcore import open_vmcore

    src, fmt, level, dst = argv
    with open_vmcore(src) as vm:
        sink = FileSink(dst)
        try:
            make_writer(vm, fmt, int(level), True).write(sink, NullMonitor())
        finally:
            sink.f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
