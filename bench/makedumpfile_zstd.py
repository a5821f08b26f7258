"""Build makedumpfile with zstd, as the reference for our zstd format in bench/run.py.

    python3 bench/makedumpfile_zstd.py SOURCE_DIR [--dest PATH]

Debian 12's makedumpfile 1.7.2 is built without zstd (``makedumpfile -v`` says "zstd
disabled", and -z is ignored), so the bench has no makedumpfile writing our zstd format's
codec to time it against. This builds one from a makedumpfile source tree (the release
Debian ships, 1.7.2, from https://github.com/makedumpfile/makedumpfile: its tag 1.7.2) with
``make LINKTYPE=dynamic USELZO=on USEZSTD=on`` and installs the binary at
``bench.measure.MAKEDUMPFILE_ZSTD`` (~/.cache/kdump-capture/makedumpfile-zstd/), where
``bench/run.py`` finds it (or give ``--makedumpfile-zstd PATH`` to the bench).

Build dependencies (Debian): libelf-dev libdw-dev libbz2-dev liblzo2-dev libzstd-dev
zlib1g-dev. Debian's mirror here serves no source packages, hence the source tree.
The build refuses a source whose version differs from the installed makedumpfile's: the
bench compares the two as one tool.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.measure import MAKEDUMPFILE_ZSTD, has_zstd, makedumpfile_version  # noqa: E402

BUILD_DEPS = "libelf-dev libdw-dev libbz2-dev liblzo2-dev libzstd-dev zlib1g-dev"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a makedumpfile source tree (its Makefile and makedumpfile.c)")
    ap.add_argument("--dest", default=MAKEDUMPFILE_ZSTD, help="where the binary goes")
    ap.add_argument(
        "--any-version",
        action="store_true",
        help="build even when the source's version is not the installed makedumpfile's",
    )
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.source, "makedumpfile.c")):
        sys.exit(f"{args.source}: no makedumpfile.c there (not a makedumpfile source tree)")
    with tempfile.TemporaryDirectory(prefix="makedumpfile-zstd-") as work:
        tree = os.path.join(work, "src")
        shutil.copytree(args.source, tree, ignore=shutil.ignore_patterns(".git"))
        # objects left in the tree may be built without zstd: start clean
        subprocess.run(["make", "clean"], cwd=tree, capture_output=True)
        cmd = ["make", "LINKTYPE=dynamic", "USELZO=on", "USEZSTD=on"]
        p = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        if p.returncode:
            tail = "\n".join((p.stdout + p.stderr).splitlines()[-15:])
            sys.exit(f"{' '.join(cmd)} failed in {args.source}:\n{tail}\n"
                     f"(build dependencies: apt-get install {BUILD_DEPS})")  # fmt: skip
        built = os.path.join(tree, "makedumpfile")
        if not has_zstd(built):
            sys.exit(f"{built}: built, but -v does not list zstd as enabled")
        ours, installed = makedumpfile_version(built), makedumpfile_version()
        if ours != installed and not args.any_version:
            sys.exit(
                f"the source is {ours!r}, the installed makedumpfile {installed!r}: the bench "
                "compares them as one tool (--any-version builds it anyway)"
            )
        os.makedirs(os.path.dirname(args.dest), exist_ok=True)
        tmp = args.dest + ".new"
        shutil.copyfile(built, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, args.dest)
    print(f"{args.dest}: {ours}, zstd enabled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
