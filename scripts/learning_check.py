"""Learning check of the two DynamicID training stages on the synthetic test-bed.

After stage 1 the denoising loss on held-out images of training identities must be lower with
their ID tokens than with the tokens zeroed; after stage 2 the tokens the IMR predicts for a
held-out target motion must be closer to the target image's tokens than the unedited source
tokens are. Both comparisons are paired (same images, noise, timesteps); a check passes when
the mean gain is positive by more than two standard errors.

Two ways to run it::

    # check exports you already have (e.g. after `dvc repro`), on params.yaml's data
    python scripts/learning_check.py --anchor runs/anchor/export --reconfigure runs/reconfigure/export

    # build a test-bed, train base -> anchor -> reconfigure with params.yaml's step counts, check
    python scripts/learning_check.py --workdir /tmp/learning-check [--identities 24 --images 14]

It prints a JSON report (also written to <workdir>/learning_check.json) and exits 1 if a check fails.
docs/training.md records the result of the second form.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_task(params, export: Path, stage: str):
    from components.train.tasks import AnchorTask, ReconfigureTask
    from model.checkpoint import load_parts
    from model.dynamicid import build_dynamicid
    from model.loading import load_backbone_for

    bb = load_backbone_for(params.model, params.storage.cache_dir, checkpoint=export)
    dyn = build_dynamicid(bb, params.model, params.face.resolved_backend(params.model.profile))
    manifest, parts = load_parts(export)
    dyn.load_parts(bb.unet, manifest, parts)
    t = params.train
    if stage == "anchor":
        task = AnchorTask(bb, dyn, params.model, t.seed)
    else:
        task = ReconfigureTask(bb, dyn, params.model, t.seed, prompt=t.reconfigure.prompt,
                               feature_weight=t.feature_weight, denoise_weight=t.denoise_weight,
                               contrastive_weight=t.contrastive_weight, temperature=t.contrastive_temperature)
    return task.eval()


def check(params, anchor: Path, reconfigure: Path) -> dict:
    from components.core.shards import PreparedData
    from components.train.checks import heldout_people, id_token_check, imr_check

    data = PreparedData(params.data.prepared)
    split, people = heldout_people(data)
    t = params.train
    report = {"heldout_split": split, "heldout_people": len(people),
              "heldout_images": sum(len(p) for p in people.values())}
    report["stage1"] = id_token_check(load_task(params, anchor, "anchor"), data, limit=t.check_images,
                                      resolution=params.model.active.resolution, repeats=t.check_repeats, seed=t.seed)
    report["stage2"] = imr_check(load_task(params, reconfigure, "reconfigure"), data, limit=t.check_images)
    for key, prefix in (("stage1", "id"), ("stage2", "imr")):
        report[key]["passed"] = bool(report[key].get(f"{prefix}_passed", 0.0))
    return report


def run_chain(workdir: Path, params_path: str | None, identities: int, images: int) -> tuple[Path, list[str]]:
    """Test-bed + the three stages as subprocesses (exactly the CLI DVC runs); returns (params file, overrides)."""
    from components.train.testbed import write_testbed

    prepared = workdir / "prepared"
    if not (prepared / "manifest.json").exists():
        t0 = time.time()
        write_testbed(prepared, identities, images, embeddings="dlib")
        print(f"test-bed: {identities} identities x {images} images in {time.time() - t0:.0f} s", flush=True)
    overrides = [f"data.prepared={prepared}", f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}"]
    overrides += [f"train.{s}.output={workdir / 'runs' / s}" for s in ("base", "anchor", "reconfigure")]
    # the check must use the base this chain trains, whatever params.yaml points model.tiny.base at
    overrides.append("model.tiny.base=null")
    cli = [sys.executable, "-m", "components.cli"] + (["--params", params_path] if params_path else [])
    cli += [a for o in overrides for a in ("-S", o)]
    timings = {}
    for stage in ("base", "anchor", "reconfigure"):
        t0 = time.time()
        subprocess.run(cli + ["train", "--stage", stage], check=True, cwd=ROOT, env={**os.environ})
        timings[stage] = round(time.time() - t0, 1)
    print(f"stage wall times (s): {timings}", flush=True)
    (workdir / "timings.json").write_text(json.dumps(timings, indent=2))
    return workdir, overrides


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=None, help="params file (default: ./params.yaml)")
    ap.add_argument("--anchor", default=None, help="stage-1 export (default: <train.anchor.output>/export)")
    ap.add_argument("--reconfigure", default=None, help="stage-2 export (default: <train.reconfigure.output>/export)")
    ap.add_argument("--workdir", default=None, help="build a test-bed here and train the chain first")
    ap.add_argument("--identities", type=int, default=24)
    ap.add_argument("--images", type=int, default=14, help="images per identity")
    args = ap.parse_args(argv)

    from components.core.config import load_params

    overrides: list[str] = []
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        _, overrides = run_chain(workdir, args.params, args.identities, args.images)
    params = load_params(args.params, overrides)
    anchor = Path(args.anchor or Path(params.train.anchor.output) / "export")
    reconfigure = Path(args.reconfigure or Path(params.train.reconfigure.output) / "export")
    report = check(params, anchor, reconfigure)
    text = json.dumps(report, indent=2)
    print(text)
    if args.workdir:
        (Path(args.workdir) / "learning_check.json").write_text(text + "\n")
    return 0 if report["stage1"]["passed"] and report["stage2"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
