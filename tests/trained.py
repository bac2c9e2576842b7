"""The trained test-bed model the behaviour tests read (tests/fixtures/testbed_trained; its README has the commands
that rebuild it) and the people it is read on: rendered with another renderer seed than its training data, so no
run has trained on them. Fixtures over these are in conftest.py (``trained_params``, ``new_people``)."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TRAINED = REPO / "tests" / "fixtures" / "testbed_trained"
BASE = REPO / "model" / "testbed_base"  # the stored base it was trained over (not bundled in the fixture)
NEW_PEOPLE, NEW_PHOTOS, NEW_PEOPLE_SEED = 24, 12, 7  # the training test bed is rendered with seed 0


def tasks(params, checkpoint: Path | None, seed: int = 0):
    """-> (DynamicID, AnchorTask, ReconfigureTask) over ``checkpoint`` (None: untrained parts seeded with ``seed``),
    on the CPU in fp32."""
    from components.train.tasks import AnchorTask, ReconfigureTask
    from model.loading import load_pipeline

    torch.manual_seed(seed)
    pipe = load_pipeline(params.model, params.face, checkpoint, params.storage.cache_dir, fuse_lora=False,
                         device="cpu", dtype="fp32")
    t = params.train
    anchor = AnchorTask(pipe.backbone, pipe.dynamicid, params.model, seed).eval()
    recon = ReconfigureTask(pipe.backbone, pipe.dynamicid, params.model, seed, prompt=t.reconfigure.prompt,
                            feature_weight=t.feature_weight, denoise_weight=t.denoise_weight,
                            contrastive_weight=t.contrastive_weight, temperature=t.contrastive_temperature).eval()
    return pipe.dynamicid, anchor, recon
