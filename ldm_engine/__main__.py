"""`python -m ldm_engine info`: print what this installation can run.
`python -m ldm_engine cache [--clear]`: list (or delete) the exported graphs and engines in the artifact cache."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_engine", description=__doc__)
    parser.add_argument("command", nargs="?", default="info", choices=["info", "cache"],
                        help="what to do (default: info)")
    parser.add_argument("--clear", action="store_true", help="with cache: delete every artifact")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.command == "cache":
        return _cache(args)
    from . import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0


def _cache(args) -> int:
    from .export.cache import ArtifactCache

    cache = ArtifactCache()
    if args.clear:
        print(f"freed {cache.clear() / 2**20:.1f} MiB under {cache.root}")
        return 0
    rows = cache.entries()
    if args.json:
        print(json.dumps({"root": str(cache.root), "artifacts": rows}, indent=2))
        return 0
    print(f"{cache.root}: {len(rows)} artifacts, {sum(r['bytes'] for r in rows) / 2**20:.1f} MiB")
    for r in rows:
        print(f"  {r['kind']:9s} {r['bytes'] / 2**20:9.1f} MiB  {r['key']}{'' if r['ok'] else '  (damaged: rebuilt on next use)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
