"""``dynamicid generate`` and ``dynamicid init``: run the pipeline from the command line."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from components.generate.args import load_landmarks, nth_value, parse_bbox, person_scales

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="generate an image of one or several people from reference photos",
        description="Put each --id-image's person into an image described by --prompt. The i-th --bbox, "
        "--expression, --driving-image, --landmarks and --person-id-scale belong to the i-th --id-image (use '-' to "
        "skip one). "
        "Without boxes, 2-4 people are placed by --layout auto (regions found from the model's own activation "
        "maps during the first steps; written next to the image as <out>.layout.png) or in equal vertical strips.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g.add_argument("--checkpoint", required=True, help="checkpoint directory (see `dynamicid init` / training)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--id-image", action="append", required=True, help="reference photo of one person (repeatable)")
    g.add_argument("--aligned", action="store_true", help="reference images are aligned face crops (no detection)")
    g.add_argument("--bbox", action="append", default=[], help="y0,x0,y1,x1 in [0,1] for the i-th person, or -")
    g.add_argument("--expression", action="append", default=[],
                   help="target expression/pose text for the i-th person, or -")
    g.add_argument("--driving-image", action="append", default=[],
                   help="photo whose face's pose and expression the i-th person takes (anyone's), or -")
    g.add_argument("--landmarks", action="append", default=[],
                   help="JSON file: target landmarks of the i-th person, [[x, y], ...] in pixels of its --id-image "
                   "(the face analyzer's layout: 68 dlib / 106 insightface points), or -")
    g.add_argument("--layout", choices=("auto", "strips"), default=None,
                   help="without --bbox: auto (default for 2-4 people) or strips; the regions used are in the JSON")
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--id-scale", type=float, default=None, help="default: model.saa.id_scale")
    g.add_argument("--person-id-scale", action="append", default=[],
                   help="identity scale of the i-th person (0 leaves them out), or - for --id-scale")
    g.add_argument("--height", type=int, default=None, help="default: the profile's resolution")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="out.png", help="output PNG; metadata goes next to it as .json")
    g.set_defaults(func=run_generate)

    i = sub.add_parser(
        "init",
        help="write a freshly initialised checkpoint (try the pipeline before training)",
        description="Build the trainable parts (face encoder, SAA + LoRA, IMR, keypoint encoder) for the "
        "configured profile and face backend with seeded random weights and write a checkpoint.",
    )
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=run_init)


def run_generate(args: argparse.Namespace, params) -> int:

    from components.core.errors import UserError
    from components.core.runtime import pipeline_from_params
    from model.checkpoint import CheckpointError
    from model.face_analysis.face import FaceAnalysisError
    from model.face_analysis.images import load_image
    from model.pipeline import GenerationError, IdentityInput

    n = len(args.id_image)
    for name in ("bbox", "expression", "driving_image", "landmarks", "person_id_scale"):
        if len(getattr(args, name)) > n:
            raise UserError(f"more --{name.replace('_', '-')} values than --id-image values")
    identities = []
    try:
        for i, path in enumerate(args.id_image):
            bbox, drive, lmk = (nth_value(v, i) for v in (args.bbox, args.driving_image, args.landmarks))
            identities.append(IdentityInput(
                image=load_image(path), aligned=args.aligned, bbox=parse_bbox(bbox) if bbox else None,
                expression=nth_value(args.expression, i), driving_image=load_image(drive) if drive else None,
                landmarks=load_landmarks(lmk) if lmk else None,
            ))
        id_scale = args.id_scale
        if (own := person_scales(args.person_id_scale, n)) is not None:  # one sample: one list, one per person
            default = params.model.saa.id_scale if id_scale is None else id_scale
            id_scale = [[default if s is None else s for s in own]]
        pipe = pipeline_from_params(params, args.checkpoint)
        out = pipe(args.prompt, identities, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, id_scale=id_scale, height=args.height, width=args.width,
                   seed=args.seed, layout=args.layout)
    except (FaceAnalysisError, GenerationError, CheckpointError, FileNotFoundError, argparse.ArgumentTypeError) as err:
        raise UserError(str(err)) from None
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    out.images[0].save(dest)
    meta = {"seed": out.seeds[0], "layout": out.layout, "identities": [r.__dict__ for r in out.identities[0]]}
    if out.layout_maps is not None:  # layout auto: each person's activation map and region, one colour each
        from model.saa.auto_run import render_layout

        maps_path = dest.with_suffix(".layout.png")
        render_layout(out.layout_maps[0], [r.region for r in out.identities[0]], out.images[0].size).save(maps_path)
        meta["layout_maps"] = maps_path.name
    dest.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    print(f"wrote {dest} ({out.images[0].width}x{out.images[0].height}); metadata {dest.with_suffix('.json')}")
    return 0


def run_init(args: argparse.Namespace, params) -> int:
    from components.core.runtime import resolve_model_paths
    from model.loading import init_checkpoint

    p = resolve_model_paths(params)
    path = init_checkpoint(p.model, p.face, args.out, p.storage.cache_dir, seed=args.seed)
    print(f"wrote freshly initialised checkpoint {path}")
    return 0
