"""Print the runtime's pip requirements from pyproject.toml, leaving out the given names.

The Jetson image installs NVIDIA's onnxruntime-gpu build, which provides the same
``onnxruntime`` module as the CPU package; letting pip also install ``onnxruntime`` from PyPI
would overwrite it. So that image installs these requirements, then the project --no-deps.

    python3 docker/runtime_requirements.py pyproject.toml --extra fast --exclude onnxruntime
"""

from __future__ import annotations

import argparse
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 on JetPack 6
    import tomli as tomllib


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def runtime_requirements(pyproject: str, extras: list[str], exclude: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pyproject has no extra '{extra}' (known: {', '.join(sorted(optional))})")
        requirements += optional[extra]
    skip = {name.lower().replace("_", "-") for name in exclude}
    return [r for r in requirements if requirement_name(r) not in skip]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--extra", action="append", default=[])
    parser.add_argument("--exclude", action="append", default=[])
    args = parser.parse_args(argv)
    print("\n".join(runtime_requirements(args.pyproject, args.extra, args.exclude)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
