"""Write the README's list of model families from a run of tests/test_families.py.

The test enumerates every causal-LM type of the installed transformers and golden-tests each one taskvec
accepts; its run writes build/families.json (accepted, declined with the reason, untested, failed). This
script runs that test file and rewrites the list between the README's markers from the report.

    .venv/bin/python scripts/families.py                 # run the family tests, rewrite the list
    .venv/bin/python scripts/families.py --from-report   # rewrite it from the last build/families.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REPORT = ROOT / "build" / "families.json"
START, END = "<!-- families:start -->\n", "<!-- families:end -->"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-report", action="store_true", help="use the last build/families.json")
    args = parser.parse_args(argv)
    if not args.from_report:
        started = time.time()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_families.py"],
                       cwd=ROOT)  # its last test fails while the README is stale: that is what is fixed here
        if not REPORT.exists() or REPORT.stat().st_mtime < started:
            print("tests/test_families.py wrote no report (did every family run?)", file=sys.stderr)
            return 1
    outcomes = json.loads(REPORT.read_text(encoding="utf-8"))
    failed = sorted(t for t, o in outcomes.items() if o["status"] == "failed")
    if failed:
        print(f"families that failed their golden test: {', '.join(failed)}", file=sys.stderr)
    sys.path.insert(0, str(ROOT / "tests"))
    from families import readme_section

    text = README.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        print(f"README.md has no {START.strip()} ... {END} section", file=sys.stderr)
        return 1
    README.write_text(pattern.sub(lambda _: START + readme_section(outcomes) + END, text), encoding="utf-8")
    counts = {s: sum(o["status"] == s for o in outcomes.values()) for s in ("accepted", "declined", "untested", "failed")}
    print(f"README.md: {counts}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
