"""`python -m web_svc [--config FILE]`: the web gateway alone (what `latentedit serve` starts beside the four services)."""

from __future__ import annotations

import argparse
import logging
import sys

from latentedit.config import load_config
from latentedit.rpc.launch import serve_one
from latentedit.rpc.security import SecurityConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m web_svc", description=__doc__)
    parser.add_argument("--config", default=None, help="the suite's YAML config (section `web`, addresses, security)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve_one("web", load_config(args.config))
    except (SecurityConfigError, OSError, ValueError) as exc:
        print(f"error: web gateway: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
