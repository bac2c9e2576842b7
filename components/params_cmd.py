"""``dynamicid params``: print the resolved, validated configuration."""

from __future__ import annotations

import argparse
import json

import yaml


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "params",
        help="print the resolved, validated configuration",
        description="Load params.yaml (plus -S overrides), validate every key and print the result "
        "with all defaults filled in. Exits 2 naming the bad key if validation fails.",
    )
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    p.add_argument("--section", default=None, help="print only this section, e.g. model or train")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, params) -> int:
    data = params.model_dump(mode="json")
    if args.section:
        for key in args.section.split("."):
            data = data[key]
    print(json.dumps(data, indent=2) if args.format == "json" else yaml.safe_dump(data, sort_keys=False), end="")
    return 0
