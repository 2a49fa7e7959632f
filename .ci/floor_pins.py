"""Prints one pip requirement per runtime dependency: its declared floor's release series (`transformers>=5.17` ->
`transformers==5.17.*`), for the floor environment of `make test-floor`. pyproject.toml's `>=` floors are the one
source of truth; `--except NAME` leaves a dependency out (torch: only one CPU build installs on the CI machine, the
Makefile pins it on its own); `--extra NAME` adds an optional group's requirements as declared (the test tools)."""

import argparse
import pathlib
import re
import tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"


def floor_pins(skip=(), extras=()):
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    for dependency in project["dependencies"]:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9]+\.[0-9]+)[^,]*(,.*)?", dependency).group(1, 2)
        if name not in skip:
            yield f"{name}=={floor}.*"
    for extra in extras:
        yield from project["optional-dependencies"][extra]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--except", dest="skip", action="append", default=[], metavar="NAME")
    parser.add_argument("--extra", dest="extras", action="append", default=[], metavar="NAME")
    arguments = parser.parse_args()
    print("\n".join(floor_pins(arguments.skip, arguments.extras)))
