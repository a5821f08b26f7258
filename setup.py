"""Build of the optional accelerator; everything else is in pyproject.toml.

``kdump_capture._speedups`` (C, links zlib) is optional: without a compiler or zlib's
headers the build step fails quietly, the package installs anyway and runs its pure-Python
path (``kdump-capture check`` says which one is active). When libzstd's headers are there
too (Debian: libzstd-dev) it also links libzstd and gets ``zstd_pages``; without them it is
built without it and zstd dumps keep python-zstandard.
"""

import os
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ZSTD_PROBE = "#include <zstd.h>\nint main(void) { return ZSTD_versionNumber() == 0; }\n"


class BuildExt(build_ext):
    """Adds libzstd to the extension when a program using it compiles and links here."""

    def build_extensions(self) -> None:
        if self._links_zstd():
            for ext in self.extensions:
                ext.define_macros.append(("HAVE_ZSTD", "1"))
                ext.libraries.append("zstd")
        else:
            print("zstd.h or libzstd not found: building _speedups without zstd_pages")
        super().build_extensions()

    def _links_zstd(self) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(ZSTD_PROBE)
            try:
                objs = self.compiler.compile([src], output_dir=tmp)
                self.compiler.link_executable(objs, "probe", output_dir=tmp, libraries=["zstd"])
            except Exception:  # CompileError, LinkError, or no compiler at all
                return False
        return True


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "kdump_capture._speedups",
            ["kdump_capture/_speedups.c"],
            libraries=["z"],
            extra_compile_args=["-O2", "-std=c99", "-Wall"],
            optional=True,
        )
    ],
)
