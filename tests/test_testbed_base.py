"""The pretrained test-bed base recipe (benchmarks/testbed_base.py) runs end to end: the prepared training split
exported, a few steps of the base stage's own VAE and UNet objectives, a base in diffusers layout that the project
loads, its record and its samples. (The recipe's real run is on a GPU; docs and issue notes give its numbers.)"""

from __future__ import annotations

import json
import tarfile

import numpy as np

from benchmarks.testbed_base import main
from components.core.config import params_from_dict
from components.core.config.data import SynthParams
from components.core.shards import PreparedData
from components.prepare.stage import prepare
from components.synth.dataset import synthesize


def test_export_train_and_load_the_base(tmp_path, cache_dir):
    params = params_from_dict({"storage": {"cache_dir": str(cache_dir)},
                               "prepare": {"workers": 1, "test_fraction": 0.25, "detection_check": 0}})
    synthesize(tmp_path / "raw", SynthParams(identities=4, images_per_identity=3, bad_samples=0, workers=1),
               progress=False)
    prepare(tmp_path / "raw", tmp_path / "prepared", params, progress=False)
    data = PreparedData(tmp_path / "prepared")
    main(["export", "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "train.npz")])
    arrays = np.load(tmp_path / "train.npz")
    assert len(arrays["pixels"]) == len(data.rows("train")) and arrays["pixels"].shape[1:] == (64, 64, 3)
    assert str(arrays["data_hash"]) == data.manifest["data_hash"]

    out = tmp_path / "out"
    main(["train", "--data", str(tmp_path / "train.npz"), "--out", str(out), "--steps", "3", "--vae-steps", "2",
          "--batch", "4", "--samples", "4"])
    record = json.loads((out / "record.json").read_text())
    assert record["steps"] == 3 and record["vae_steps"] == 2 and record["data_hash"] == data.manifest["data_hash"]
    assert record["command"].startswith("python -m benchmarks.testbed_base train") and record["latent_scale"] > 0
    assert np.load(out / "samples.npz")["images"].shape == (4, 64, 64, 3)
    with tarfile.open(out / "base.tar") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    from model.backbone import load_backbone

    bb = load_backbone(tmp_path / "unpacked" / "base")  # what model.tiny.base will point at
    assert abs(bb.vae.config.scaling_factor - record["latent_scale"]) < 1e-6
