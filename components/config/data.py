"""Sections of the data stages: synth (embedded test-bed) and prepare."""

from __future__ import annotations

from pydantic import Field

from model.config import StrictModel


class DataParams(StrictModel):
    raw: str = Field("data/raw", description="input data set root: local directory or s3://bucket/prefix")
    prepared: str = Field("data/prepared", description="prepared shards, index and report")


class SynthParams(StrictModel):
    """The synthetic face test-bed written by ``dynamicid synth`` (components/synth.py)."""

    identities: int = Field(48, ge=2)
    images_per_identity: int = Field(35, ge=2, description="35 = every expression x pose combination once")
    size: int = Field(128, ge=64, description="image side in pixels")
    seed: int = 0
    bad_samples: int = Field(
        6, ge=0, le=6,
        description="deliberately bad files to write (truncated PNG, empty file, no face, two faces, "
        "duplicate, tiny face; the first N) so that prepare's quarantine has something to report",
    )
    supersample: int = Field(2, ge=1, le=4, description="render at this many samples per pixel side, then box-filter")
    workers: int = Field(0, ge=0, description="rendering processes; 0 = all cores")
    check_faces: bool = Field(
        False, description="after writing, measure dlib face detection / recognition on the test-bed and report it"
    )


class PrepareParams(StrictModel):
    shard_size: int = Field(512, ge=1, description="samples per shard")
    test_fraction: float = Field(0.125, ge=0.0, lt=1.0, description="fraction of identities held out for test")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    split_seed: int = 0
    workers: int = Field(0, ge=0, description="0 = all cores")
    crop_size: int = Field(128, ge=32, description="side of the aligned face crop stored per sample")
    image_size: int = Field(64, ge=8, description="side of the training image stored per sample")
    one_face: bool = Field(True, description="reject images with several faces")
