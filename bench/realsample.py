"""Print the path of a real vmcore sample, generating it first if needed.

usage: python3 bench/realsample.py [--mem 512|2048] [--force] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import vmkit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mem", type=int, default=512, help="guest memory in MiB (512, 2048)")
    parser.add_argument(
        "--crashkernel",
        type=int,
        default=vmkit.sample.DEFAULT_CRASHKERNEL_MIB,
        help="crashkernel= reservation in MiB",
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if cached")
    parser.add_argument("--json", action="store_true", help="print the sidecar instead")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        sample = vmkit.get_sample(args.mem, crashkernel_mib=args.crashkernel, force=args.force)
    except vmkit.VmError as exc:
        print(f"realsample: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(sample.meta, indent=2) if args.json else sample.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
