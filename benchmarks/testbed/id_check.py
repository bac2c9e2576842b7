"""Stage 1's learning check over a checkpoint, with the captions or with one prompt for every image (issue 16).

The shipped check (components.train.checks.id_token_check, run at the end of stage 1) reads, on held-out people,
the loss with another person's tokens minus the loss with tokens from another photo of the same person, each
image with its caption. The test bed's captions name hair, beard, glasses and hat, so they give away much of who
a person is; with ``--prompt ''`` the tokens are the only conditioning, and with the evaluation's prompt the
condition is the one images are generated under. Read every checkpoint beside ``--checkpoint init`` (fresh parts
over the same base): an untrained branch already has a large, person-dependent effect, so what training has to
show is a consistent one (docs/evaluation.md, "stage 1 with the text dropped more often").

    python -m benchmarks.testbed.id_check --checkpoint runs/anchor/export [--prompt ''] [--prompt 'a photo of a person']

Prints one JSON object per reading (``caption`` for the shipped one); ``--params`` and ``-S`` as for ``dynamicid``.
"""

from __future__ import annotations

import json
import sys

from benchmarks.testbed.id_signal import anchor_task, reading_parser


def main(argv: list[str] | None = None) -> None:
    from components.core.config import load_params
    from components.core.shards import PreparedData
    from components.train.checks import heldout_people, id_token_check

    p = reading_parser(__doc__)
    p.add_argument("--prompt", action="append", default=None,
                   help="one text for every image instead of its caption (repeatable; default: the captions)")
    p.add_argument("--caption", action="store_true", help="also read with the captions when --prompt is given")
    args = p.parse_args(argv)
    params = load_params(args.params, args.overrides)
    task = anchor_task(params, None if args.checkpoint == "init" else args.checkpoint).eval()
    data = PreparedData(params.data.prepared)
    if not heldout_people(data)[1]:
        sys.exit(f"{params.data.prepared}: no held-out people with two photos each (val or test split)")
    readings = ([None] if args.caption or not args.prompt else []) + list(args.prompt or [])
    for prompt in readings:
        found = id_token_check(task, data, limit=params.train.check_images, resolution=params.model.tiny.resolution,
                               repeats=params.train.check_repeats, seed=params.train.seed, prompt=prompt)
        keep = ("id_gain", "id_gain_low", "id_gain_high", "id_gain_people", "id_gain_comparisons", "id_gain_passed")
        print(json.dumps({"checkpoint": args.checkpoint, "text": "caption" if prompt is None else prompt,
                          **{k: found[k] for k in keep}}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
