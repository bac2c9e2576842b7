"""``dynamicid``: one CLI whose subcommands are the system's stages.

Every stage module exposes ``register(subparsers)`` which adds its subcommand and sets
``func(args, params)``. Stage modules import heavy libraries inside their functions so
that ``dynamicid --help`` and ``dynamicid params`` stay fast and work without torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from components.core.config import ParamsError, load_params
from components.core.config.weights import check_cli_weights
from components.core.errors import UserError

# Order is the order shown by --help; it follows the pipeline.
STAGE_MODULES = [
    "components.params_cmd",
    "components.synth.dataset",
    "components.prepare.stage",
    "components.train.entry",
    "components.deploy.launch",
    "components.evaluate.stage",
    "components.register.stage",
    "components.summary.stage",
    "components.deploy.inference_service",
    "components.generate.stage",
    "components.release.stage",
    "serving.cli",
    "pipelines.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamicid",
        description="DynamicID: train, evaluate, register and serve tuning-free multi-ID personalisation "
        "with editable expression and pose. Every subcommand reads params.yaml.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--params", default=None, help="params file (default: $DYNAMICID_PARAMS or ./params.yaml)"
    )
    parser.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a params key for this run, e.g. -S model.profile=sd15 (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a stage not built yet in this checkout
            if err.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from model.notices import quiet_library_warnings

    quiet_library_warnings()  # library warnings a user can do nothing about (model/notices.py)
    from components.core import redact

    secrets = redact.install().secrets  # logs, warnings and tracebacks carry no credentials
    try:
        params = load_params(args.params, args.overrides)
        check_cli_weights(args, params)  # a missing weight location fails here, naming its key, before any work
        result = args.func(args, params)
    except (ParamsError, UserError) as err:
        print(f"dynamicid {args.command}: error: {redact.redact_text(str(err), secrets)}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
