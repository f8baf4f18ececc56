"""What every ``python -m tfjobs.<job>`` command shares: logging and printing results."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Any


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    parser.add_argument(
        "--s3-endpoint-url",
        default="",
        help="S3 endpoint for s3:// URIs, e.g. MinIO's (credentials: the standard AWS_* variables or ~/.aws)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.s3_endpoint_url:
        from tfjobs.storage import s3

        s3.configure(endpoint_url=args.s3_endpoint_url)
    return args


def print_result(result: Any) -> None:
    """Print a job's result as one JSON object on stdout, for scripts to read."""
    if dataclasses.is_dataclass(result):
        result = dataclasses.asdict(result)
    json.dump(result, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
