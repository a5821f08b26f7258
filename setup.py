"""Build of the optional accelerator; everything else is in pyproject.toml.

``kdump_capture._speedups`` (C, links zlib) is optional: without a compiler or zlib's
headers the build step fails quietly, the package installs anyway and runs its pure-Python
path (``kdump-capture check`` says which one is active). When libzstd's headers are there
too (Debian: libzstd-dev) it also links libzstd and gets ``zstd_pages``; without them it is
built without it and zstd dumps keep python-zstandard. Likewise liblzo2 (Debian:
liblzo2-dev) gives ``lzo_pages``, else lzo dumps keep python-lzo.
"""

import os
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# (macro, library, a program that must compile and link against it, what goes without it)
OPTIONAL_LIBS = (
    (
        "HAVE_ZSTD",
        "zstd",
        "#include <zstd.h>\nint main(void) { return ZSTD_versionNumber() == 0; }\n",
        "zstd_pages",
    ),
    (
        "HAVE_LZO",
        "lzo2",
        "#include <lzo/lzo1x.h>\nint main(void) { return lzo_init() != LZO_E_OK; }\n",
        "lzo_pages",
    ),
)


class BuildExt(build_ext):
    """Adds each optional library to the extension when a program using it links here."""

    def build_extensions(self) -> None:
        for macro, lib, probe, what in OPTIONAL_LIBS:
            if self._links(lib, probe):
                for ext in self.extensions:
                    ext.define_macros.append((macro, "1"))
                    ext.libraries.append(lib)
            else:
                print(f"lib{lib} or its headers not found: building _speedups without {what}")
        super().build_extensions()

    def _links(self, lib: str, probe: str) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(probe)
            try:
                objs = self.compiler.compile([src], output_dir=tmp)
                self.compiler.link_executable(objs, "probe", output_dir=tmp, libraries=[lib])
            except Exception:  # CompileError, LinkError, or no compiler at all
                return False
        return True


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "kdump_capture._speedups",
            ["kdump_capture/_speedups.c", "kdump_capture/_deflate1.c"],
            libraries=["z"],
            extra_compile_args=["-O2", "-std=c99", "-Wall"],
            optional=True,
        )
    ],
)
