"""An imported release checkpoint for the step benchmark: random-valued files in the release's layout, imported.

Issue 18 asks that the GPU step benchmark run once with weights that came through ``dynamicid import-release``
and that its step ratio match our own checkpoint's. The real files cannot be downloaded on a benchmark machine,
and timing does not depend on weight values, so the files are built here from the release's key/shape tables
(``model.release.layout``) with seeded random fp16 tensors and imported with the real importer; the benchmark
then loads the checkpoint's SAA part into its UNet before merging LoRA (``python -m benchmarks.run
--release-import``). The "smoke" size keeps the structure at the smoke UNet's widths for a CPU dry run.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from benchmarks.sd15 import DIMS, Size
from model.release.layout import SD15_UNET, ReleaseLayout


def release_layout(size: Size) -> ReleaseLayout:
    if size == "sd15":
        return ReleaseLayout.sd15()
    d = DIMS[size]
    return ReleaseLayout(profile="sd15", unet={**SD15_UNET, "block_out_channels": list(d.unet_channels)},
                         clip_dim=d.vision["hidden_size"], token_dim=d.cross_dim, text_dim=d.text["hidden_size"],
                         lora_rank=4, fe_depth=1, fe_heads=2, fe_dim_head=16, fe_ff_mult=2, imr_width=32,
                         imr_heads=2, imr_ff_mult=2, landmark_dim=32)


def _random(table: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.tensor(0, dtype=torch.int64) if k.endswith("num_batches_tracked")
            else (torch.randn(shape, generator=g) * 0.02).half() for k, shape in table.items()}


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def imported_release_checkpoint(size: Size, out_dir: Path, seed: int = 0) -> Path:
    """Write release-layout files (SAA.bin, IMR.bin, key_point_encoder.bin contents) and import them -> checkpoint."""
    from model.release.convert import ReleaseSource, import_release

    layout = release_layout(size)
    saa = {"proj_module": _random(layout.face_encoder_shapes(), seed),
           "SAA_module": _random(layout.saa_shapes(), seed + 1)}
    files = [ReleaseSource("random:SAA.bin", _bytes(saa)),
             ReleaseSource("random:IMR.bin", _bytes(_random(layout.imr_shapes(), seed + 2))),
             ReleaseSource("random:key_point_encoder.bin", _bytes(_random(layout.keypoint_shapes(), seed + 3)))]
    return import_release(*files, Path(out_dir), layout=layout)
