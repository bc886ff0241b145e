"""Run by a freshly built venv's own Python (install.Venv): its versions are the pinned ones, its modules
import, its executables exist. Standard library only; not imported by the harness.

    python venv_check.py '{"ndif": "0.1.2", ...}' --import ndif.services.api.app ... --executable moto_server
"""

import argparse
import importlib
import importlib.metadata
import json
import shutil
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pins", help="JSON: distribution -> version")
    parser.add_argument("--import", dest="modules", nargs="*", default=[])
    parser.add_argument("--executable", nargs="*", default=[])
    args = parser.parse_args()
    pins = json.loads(args.pins)
    got = {name: importlib.metadata.version(name) for name in pins}
    # A local version label (torch's "+cu130") is the build, not another version.
    bad = {name: version for name, version in got.items() if version.split("+")[0] != pins[name]}
    assert not bad, f"unexpected versions: {bad} (pinned: {pins})"
    for module in args.modules:
        importlib.import_module(module)
    for name in args.executable:
        assert shutil.which(name, path=sys.prefix + "/bin"), f"no {name} in {sys.prefix}/bin"
    print("venv ok:", got)


if __name__ == "__main__":
    main()
