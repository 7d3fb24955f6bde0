"""mt-serve: placeholder until the service lands (issue 4)."""

import sys


def main() -> int:
    print("mt-serve is not yet available: the HTTP service lands with issue 4.", file=sys.stderr)
    return 2
