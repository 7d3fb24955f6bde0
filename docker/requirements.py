"""Print the requirements of pyproject.toml's core and the given extras, one per line, for a Docker stage.

    python docker/requirements.py serve gpu --without onnxruntime

Images install these first and then the project with ``--no-deps``: that way the GPU image gets
``onnxruntime-gpu`` without the CPU ``onnxruntime`` of the ``serve`` extra (both provide the same module).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a requirement string ("uvicorn[standard]>=0.29" → "uvicorn")."""
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def requirements(extras: list[str], without: set[str], pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    available = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in available]
    if unknown:
        raise SystemExit(f"{pyproject} has no extra {', '.join(unknown)} (it has {', '.join(sorted(available))})")
    wanted = list(project.get("dependencies", []))
    for extra in extras:
        wanted += available[extra]
    out: list[str] = []
    for requirement in wanted:
        if requirement_name(requirement) not in without and requirement not in out:
            out.append(requirement)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="extras of pyproject.toml to include")
    parser.add_argument("--without", action="append", default=[], help="leave out this distribution (repeatable)")
    args = parser.parse_args(argv)
    print("\n".join(requirements(args.extras, {name.lower() for name in args.without})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
