"""What a pipeline component body calls: one ``dynamicid`` subcommand, in-process.

Kept outside the component functions because kfp ships a component's source (not its module) to
the pod; these helpers come from the installed package in the image instead, so every step runs
exactly the installed code, and the few lines that turn an exit status into a task failure or a
result file into an output parameter are tested once here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from components.deploy.settings import settings_args


class StepError(RuntimeError):
    """A ``dynamicid`` subcommand exited non-zero: the pipeline task fails with this message."""


def run(settings: list[str], *args: str) -> None:
    """``dynamicid -v -S ... ARGS``; raise unless it exits 0."""
    from components.cli import main

    argv = ["-v", *settings_args(settings), *args]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse rejects the arguments (e.g. a flag the stage lacks)
        code = exit_.code
    if code:
        raise StepError(f"`dynamicid {' '.join(args)}` exited with status {code}")


def run_for_value(settings: list[str], *args: str, flag: str, filename: str = "value") -> str:
    """Run a subcommand that writes its result to the file named by ``flag``; return the text.
    ``filename``: for subcommands that check the file's extension."""
    with tempfile.TemporaryDirectory(prefix="dynamicid-step-") as tmp:
        target = Path(tmp) / filename
        run(settings, *args, flag, str(target))
        if not target.exists():
            raise StepError(f"`dynamicid {' '.join(args)}` exited 0 but wrote nothing to {flag}")
        return target.read_text().strip()


def decision(settings: list[str], *args: str, flag: str = "--decision-file", filename: str = "value") -> bool:
    """A gate's yes/no ("true"/"false" in the decision file) as a pipeline condition value."""
    text = run_for_value(settings, *args, flag=flag, filename=filename).lower()
    if text not in ("true", "false"):
        raise StepError(f"`dynamicid {' '.join(args)}` wrote {text!r} to {flag}; expected true or false")
    return text == "true"
