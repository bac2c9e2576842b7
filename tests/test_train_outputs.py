"""The three stages chained as DVC runs them (tiny, a few steps each), and what they leave behind:
the base export that stage 1 starts from, stage exports that load into DynamicIDPipeline, the
files DVC tracks, and the contents of the MLflow runs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

STEPS = {"base": 3, "anchor": 4, "reconfigure": 4}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, cache_dir):
    """Runs base -> anchor -> reconfigure once for the module; returns the working directory."""
    from components.train.testbed import write_testbed

    root = tmp_path_factory.mktemp("chain")
    write_testbed(root / "prepared", identities=5, images_per_identity=4, test_identities=2)  # 2 held-out people
    params = {
        "storage": {"cache_dir": str(cache_dir)},
        "data": {"prepared": str(root / "prepared")},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "train-test"},
        "train": {
            "checkpoint_every": 2, "log_every": 2, "sample_every": 2, "sample_count": 2, "sample_steps": 2,
            "holdout_per_identity": 1, "check_repeats": 1,
            "base": {"steps": STEPS["base"], "vae_steps": 2, "micro_batch": 2, "warmup_steps": 1,
                     "output": str(root / "runs" / "base")},
            "anchor": {"steps": STEPS["anchor"], "micro_batch": 2, "warmup_steps": 1,
                       "output": str(root / "runs" / "anchor")},
            "reconfigure": {"steps": STEPS["reconfigure"], "micro_batch": 2, "warmup_steps": 1,
                            "targets_per_source": 2, "output": str(root / "runs" / "reconfigure")},
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = {}
    for stage in ("base", "anchor", "reconfigure"):
        done = subprocess.run([sys.executable, "-m", "components.cli", "--params", str(root / "params.yaml"),
                               "train", "--stage", stage], env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-4000:]
        logs[stage] = done.stderr
    return root, logs


def _params(root: Path):
    from components.core.config import load_params

    return load_params(root / "params.yaml")


def test_base_stage_writes_a_trained_base_that_stage_1_starts_from(chain, cache_dir):
    root, logs = chain
    base = root / "runs" / "base" / "export"
    from model.backbone import load_backbone

    bb = load_backbone(base)  # diffusers layout, loadable by the one loading path
    seeded = load_backbone(next(Path(cache_dir).glob("tiny-base-*")))
    assert bb.vae.config.scaling_factor != seeded.vae.config.scaling_factor  # set from the trained latents
    trained_unet = dict(bb.unet.named_parameters())
    assert any(not (p == trained_unet[n]).all() for n, p in seeded.unet.named_parameters())
    manifest = json.loads((root / "runs" / "anchor" / "export" / "manifest.json").read_text())
    assert manifest["trained_from"] == str(base) and manifest["stage"] == "anchor"
    assert "no trained tiny base" not in logs["anchor"]


def test_exports_hold_the_trainable_parts_and_load_into_the_pipeline(chain):
    from model.checkpoint import load_parts
    from model.loading import load_pipeline
    from model.pipeline import IdentityInput

    root, _ = chain
    params = _params(root)
    anchor, reconf = root / "runs" / "anchor" / "export", root / "runs" / "reconfigure" / "export"
    m1, parts1 = load_parts(anchor)
    m2, parts2 = load_parts(reconf)
    assert sorted(parts1) == ["face_encoder", "saa"] and m1["bundled_base"] is True
    assert sorted(parts2) == ["face_encoder", "imr", "keypoint_encoder", "saa"] and m2["stage"] == "reconfigure"
    # stage 2 froze the stage-1 parts: they are bit-identical in both exports
    for part in ("face_encoder", "saa"):
        assert all(np.array_equal(parts1[part][k].numpy(), parts2[part][k].numpy()) for k in parts1[part])
    assert all(v.dtype.is_floating_point and v.dtype == parts2["imr"][k].dtype for k, v in parts2["imr"].items())
    from components.core.shards import PreparedData

    sample = PreparedData(params.data.prepared).sample(0)
    pipe = load_pipeline(params.model, params.face, reconf, params.storage.cache_dir)
    pipe.set_progress(False)
    from model.dynamicid import clip_image_features
    import torch

    crop = torch.from_numpy(sample.face_crop.copy()).permute(2, 0, 1)[None].float() / 255
    feats = clip_image_features(pipe.backbone, crop)[0]
    out = pipe("a photo of a person", [IdentityInput(embedding=sample.embedding, clip_features=feats,
                                                      expression="the expression is happy")],
               num_inference_steps=2, seed=0, output_type="pt")
    assert out.images.shape == (1, 3, 64, 64) and out.identities[0][0].edited
    assert torch.isfinite(out.images).all()


def test_stage_2_keeps_stage_1_weights_exact_under_a_half_precision_frozen_base(chain):
    """A GPU run keeps the frozen base in fp16/bf16 beside fp32 trainable parts. Placing that base casts the SAA
    processors in the UNet too; on an H100 (2026-12-05) stage 2 loaded the stage-1 weights before that cast, so
    every SAA weight came back fp16-rounded and the anchor's learning check no longer matched the export. The
    same casts, forced here with train.frozen_dtype=bf16 on the CPU, must leave the stage-1 parts bit-identical."""
    from components.evaluate.measure import learning_check_records
    from model.checkpoint import load_parts

    root, _ = chain
    out = root / "runs" / "reconfigure-bf16-base"
    done = subprocess.run([sys.executable, "-m", "components.cli", "--params", str(root / "params.yaml"),
                           "-S", "train.frozen_dtype=bf16", "-S", f"train.reconfigure.output={out}",
                           "-S", "train.reconfigure.steps=1",
                           "train", "--stage", "reconfigure"], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    _, before = load_parts(root / "runs" / "anchor" / "export")
    _, after = load_parts(out / "export")
    for part in ("face_encoder", "saa"):
        assert all(np.array_equal(before[part][k].numpy(), after[part][k].numpy()) for k in before[part]), part
    assert learning_check_records(out / "export")["anchor"]["weights_match"] is True


def test_stage_outputs_for_dvc(chain):
    root, _ = chain
    for stage, steps in STEPS.items():
        out = root / "runs" / stage
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps"] == steps and metrics["loss_final"] > 0
        with open(out / "loss.tsv") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
        assert all(float(r["loss"]) > 0 and float(r["samples_per_s"]) > 0 for r in rows)
        ckpts = out / "checkpoints" / ("unet" if stage == "base" else "")
        assert (ckpts / "latest").read_text().strip() == f"step-{steps:06d}"
    assert {"heldout_loss_own_id", "heldout_loss_other_id", "id_gain", "id_gain_low", "id_gain_high",
            "id_gain_people", "id_passed"} <= set(json.loads((root / "runs" / "anchor" / "metrics.json").read_text()))
    assert {"heldout_dist_pred", "heldout_dist_shuffled", "imr_gain", "imr_gain_low", "imr_stay_ratio_high",
            "imr_passed"} <= set(json.loads((root / "runs" / "reconfigure" / "metrics.json").read_text()))
    # the verdicts travel with the weights: the reconfigure export carries both stages'
    from model.checkpoint import read_manifest

    checks = read_manifest(root / "runs" / "reconfigure" / "export")["learning_checks"]
    assert set(checks) == {"anchor", "reconfigure"} and all(isinstance(c["passed"], bool) for c in checks.values())
    assert checks["anchor"]["metrics"]["id_gain"] == pytest.approx(
        json.loads((root / "runs" / "anchor" / "metrics.json").read_text())["id_gain"])
    # ... bound to the weights they were measured on: stage 2 froze stage 1's parts, so both records match the
    # reconfigure export, and the anchor's record matches the anchor export too
    from components.evaluate.measure import learning_check_records

    bound = learning_check_records(root / "runs" / "reconfigure" / "export")
    assert {stage: r["weights_match"] for stage, r in bound.items()} == {"anchor": True, "reconfigure": True}
    assert learning_check_records(root / "runs" / "anchor" / "export")["anchor"]["weights_match"] is True
    # stage 1 trained from its frozen-feature cache: one complete cache of exactly the training images
    from components.core.shards import PreparedData
    from components.train.data import holdout_split

    caches = list((root / "runs" / "anchor" / "feature_cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "meta.json").exists()
    meta = json.loads((caches[0] / "meta.json").read_text())
    params = _params(root)
    split = holdout_split(PreparedData(params.data.prepared), params.train.holdout_per_identity)
    assert meta["positions"] == split.train and meta["world"] == 1 and meta["dtype"] == "fp32"
    assert not set(meta["positions"]) & set(split.heldout)
    rec = list(csv.DictReader(open(root / "runs" / "reconfigure" / "loss.tsv"), delimiter="\t"))
    assert all(r["feature"] and r["denoise"] and not r["contrastive"] for r in rec)  # contrastive_weight 0
    assert (root / "runs" / "base" / "vae_loss.tsv").exists()
    assert (root / "runs" / "base" / "checkpoints" / "unet" / "latest").exists()


def test_mlflow_run_holds_params_lineage_metrics_samples_and_the_export(chain):
    from mlflow import MlflowClient

    from components.core.config import flatten
    from components.core.tracking import data_version

    root, _ = chain
    params = _params(root)
    client = MlflowClient(tracking_uri=params.mlflow.tracking_uri)
    run_id = json.loads((root / "runs" / "anchor" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train-anchor"
    assert client.get_experiment(run.info.experiment_id).name == "train-test"
    logged = run.data.params
    flat = flatten(params)
    assert logged["train.anchor.lr"] == str(flat["train.anchor.lr"])
    assert logged["model.profile"] == "tiny" and logged["train.zero_stage"] == "2"
    assert len([k for k in logged if k in flat]) == len(flat)  # every params.yaml key
    assert logged["data_version"] == data_version(params.data.prepared) and logged["data_version"] != "unknown"
    assert logged["git_commit"] and logged["stage"] == "anchor"
    assert run.data.tags["mlflow.source.git.commit"] == logged["git_commit"]
    for key in ("loss", "lr", "samples_per_s"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(1, STEPS["anchor"] + 1)), key
    assert run.data.metrics["final/id_gain"] == pytest.approx(
        json.loads((root / "runs" / "anchor" / "metrics.json").read_text())["id_gain"])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"samples", "export", "metrics.json"} <= artifacts
    samples = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert samples == ["samples/anchor_step000002.png", "samples/anchor_step000004.png"]
    exported = {a.path for a in client.list_artifacts(run_id, "export")}
    assert {"export/manifest.json", "export/saa.safetensors", "export/face_encoder.safetensors"} <= exported
    local = client.download_artifacts(run_id, "export/manifest.json", str(root / "dl"))
    assert json.loads(Path(local).read_text())["stage"] == "anchor"
    # the base stage logs both phases in one run
    base_run = json.loads((root / "runs" / "base" / "mlflow_run.json").read_text())["run_id"]
    assert len(client.get_metric_history(base_run, "vae/loss")) == 2
    assert len(client.get_metric_history(base_run, "loss")) == STEPS["base"]


def test_stage_1_fine_tunes_from_an_export_with_train_anchor_init_from(chain):
    """``train.anchor.init_from``: stage 1 starts from an export's face encoder and SAA weights (fine-tuning, e.g.
    a text-dropped stage 1 or imported release weights) instead of fresh ones. One step at lr 1e-12 moves nothing
    measurable, so the run's export must equal the one it started from; the same run without it (the control)
    starts fresh and does not. A path that is not an export stops the stage naming the key."""
    import torch

    from model.checkpoint import load_parts

    root, _ = chain
    start = root / "runs" / "anchor" / "export"
    _, before = load_parts(start)

    def run(name: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "components.cli", "--params", str(root / "params.yaml"),
                               "-S", f"train.anchor.output={root / 'runs' / name}", "-S", "train.anchor.steps=1",
                               "-S", "train.anchor.lr=1e-12", "-S", "train.check_images=0", *extra,
                               "train", "--stage", "anchor"], capture_output=True, text=True, timeout=400)

    def same(parts: dict) -> bool:
        return all(torch.allclose(parts[p][k].float(), before[p][k].float(), atol=1e-6)
                   for p in ("face_encoder", "saa") for k in before[p])

    for name, extra, expected in (("anchor-tuned", ("-S", f"train.anchor.init_from={start}"), True),
                                  ("anchor-fresh", (), False)):
        done = run(name, *extra)
        assert done.returncode == 0, done.stderr[-4000:]
        assert same(load_parts(root / "runs" / name / "export")[1]) is expected, name
    bad = run("anchor-bad", "-S", f"train.anchor.init_from={root / 'prepared'}")
    assert bad.returncode != 0 and "train.anchor.init_from" in bad.stderr, bad.stderr[-2000:]
