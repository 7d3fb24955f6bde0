"""mt-export: placeholder until the ONNX export lands (issue 3)."""

import sys


def main() -> int:
    print("mt-export is not yet available: the ONNX export lands with issue 3.", file=sys.stderr)
    return 2
