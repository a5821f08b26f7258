"""Build of the optional accelerator; everything else is in pyproject.toml.

``kdump_capture._speedups`` (C, links zlib) is optional: without a compiler or zlib's
headers the build step fails quietly, the package installs anyway and runs its pure-Python
path (``kdump-capture check`` says which one is active).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kdump_capture._speedups",
            ["kdump_capture/_speedups.c"],
            libraries=["z"],
            extra_compile_args=["-O2", "-std=c99", "-Wall"],
            optional=True,
        )
    ]
)
