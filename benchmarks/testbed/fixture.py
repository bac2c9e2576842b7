"""Write the trained test-bed fixture the behaviour tests read (issue 16, item 3) from a GPU-trained export.

The export of `benchmarks/testbed/run_gpu.sh` (stage 2, which also carries stage 1's parts) is copied without its
bundled base (the tests load the stored base, model/testbed_base, as the recipe trained on) and with every part
rounded to fp16, which halves it to under 3 MB in the repository; the tests measure these rounded weights
themselves. The learning-check records are dropped: they were measured on the fp32 weights, and their digest
would not match. What was trained and how goes into the manifest's ``fixture`` entry and the folder's README.

    python -m benchmarks.testbed.fixture --export runs/testbed-gpu/reconfigure/export \
        --out tests/fixtures/testbed_trained
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def write_fixture(export: Path, out: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from model.checkpoint import MANIFEST, load_parts, sha256_file

    manifest, parts = load_parts(export)  # verifies the export's file hashes first
    if "imr" not in parts:
        raise SystemExit(f"{export}: a stage-2 export is needed (it holds both stages' parts); parts: {sorted(parts)}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    for name in sorted(parts):
        fname = f"{name}.safetensors"
        meta = {"part": name, "profile": manifest["dims"]["profile"], "rounded": "fp16"}
        tensors = load_file(export / fname)
        save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, tmp / fname, metadata=meta)
        files[fname] = sha256_file(tmp / fname)
    learned = {stage: record.get("metrics", {}) for stage, record in manifest.get("learning_checks", {}).items()}
    manifest = {k: v for k, v in manifest.items() if k not in ("learning_checks", "trained_from")}
    manifest.update(files=files, bundled_base=False, fixture={
        "export": str(export), "rounded": "fp16",
        "base": "model/testbed_base", "learning_checks_fp32": learned})
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", type=Path, required=True, help="a stage-2 export (run_gpu.sh's reconfigure/export)")
    p.add_argument("--out", type=Path, default=Path("tests/fixtures/testbed_trained"))
    args = p.parse_args(argv)
    manifest = write_fixture(args.export, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out}: parts {manifest['parts']}, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
