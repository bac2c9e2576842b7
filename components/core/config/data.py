"""Sections of the data stages: synth (embedded test-bed) and prepare."""

from __future__ import annotations

from pydantic import Field, field_validator

from model.config import StrictModel


class DataParams(StrictModel):
    raw: str = Field("data/raw", description="input data set root: local directory or s3://bucket/prefix")
    prepared: str = Field("data/prepared", description="prepared shards, index and report")


class SynthParams(StrictModel):
    """The synthetic face test-bed written by ``dynamicid synth`` (components/synth/dataset.py)."""

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
    """``dynamicid prepare`` (components/prepare/stage.py, docs/data.md)."""

    shard_size: int = Field(512, ge=1, description="samples per shard")
    test_fraction: float = Field(0.125, ge=0.0, lt=1.0, description="fraction of identities held out for test")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of identities held out for validation")
    split_seed: int = Field(0, description="identities are ranked by sha256(split_seed, name) to pick the splits")
    workers: int = Field(0, ge=0, description="analysis processes; 0 = all cores (1 when there is little to do)")
    crop_size: int = Field(
        0, ge=0, description="side of the face crop (CLIP image-encoder input) stored per sample; "
        "0 = model.<profile>.face_crop_size",
    )
    image_size: int = Field(
        0, ge=0, description="side of the training image stored per sample; 0 = model.<profile>.resolution"
    )
    one_face: bool = Field(True, description="reject images with several faces (of at least face.min_face_size)")
    default_caption: str = Field("a photo of a person", min_length=1,
                                 description="caption of images that captions.jsonl does not list")
    detection_check: int = Field(
        64, ge=0, description="annotated images also run through the face detector to measure its detection "
        "rate on this data (data_report.json detection_check); 0 = off",
    )
    max_file_mb: float = Field(64.0, gt=0, description="larger files are quarantined without being read")
    max_pixels: int = Field(
        64_000_000, ge=1, description="images whose header declares more pixels (width x height) are quarantined "
        "as too_many_pixels before any pixel is decoded: decompression bombs, forged headers",
    )
    work_dir: str | None = Field(
        None, description="content-addressed per-image results (resume, no-op reruns); "
        "null = <storage.cache_dir>/prepare. Safe to delete (everything is recomputed).",
    )

    @field_validator("crop_size", "image_size")
    @classmethod
    def _size(cls, v: int) -> int:
        if 0 < v < 8:
            raise ValueError("must be 0 (follow the model profile) or at least 8 pixels")
        return v
