"""mt-translate: placeholder until the batch client lands (issue 5)."""

import sys


def main() -> int:
    print("mt-translate is not yet available: the batch client lands with issue 5.", file=sys.stderr)
    return 2
