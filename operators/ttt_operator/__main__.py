"""`python -m ttt_operator`: run the operator (one instance: no peering), watching the namespaces of
TTT_OPERATOR_NAMESPACES or all of them, with a liveness endpoint for the Deployment's probes."""

from __future__ import annotations

import argparse
import logging
import sys

import kopf

from ttt.errors import UserError


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ttt_operator", description=__doc__)
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")
    args = parser.parse_args()
    try:
        from ttt_operator import handlers  # registers the handlers; reads the settings
    except UserError as exc:
        sys.exit(f"ttt_operator: {exc}")
    settings = handlers.SETTINGS
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=args.liveness or None,
    )


if __name__ == "__main__":
    main()
