"""`python -m ldm_engine info`: print what this installation can run."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_engine", description=__doc__)
    parser.add_argument("command", nargs="?", default="info", choices=["info"], help="what to do (default: info)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    from . import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
