"""Shared fixtures: tiny-profile params with a per-session cache, and real face photos.

The tiny base is built in code once per test session (seeded), then every test loads it
through the real ``from_pretrained(local_files_only=True)`` path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dynamicid-cache")


@pytest.fixture(scope="session")
def tiny_params(cache_dir):
    """Params for the embedded default (tiny profile, dlib faces) with a session cache."""
    from components.core.config import params_from_dict

    return params_from_dict({"storage": {"cache_dir": str(cache_dir)}})


@pytest.fixture(scope="session")
def init_ckpt(tiny_params, tmp_path_factory) -> Path:
    """A freshly initialised tiny checkpoint (seed 1), read-only for the tests that share it."""
    from model.loading import init_checkpoint

    out = tmp_path_factory.mktemp("init-ckpt") / "init"
    return init_checkpoint(tiny_params.model, tiny_params.face, out, tiny_params.storage.cache_dir, seed=1)


@pytest.fixture(scope="session")
def trained_params(cache_dir):
    """Tiny-profile params over the stored base the trained fixture was trained on (model/testbed_base)."""
    from components.core.config import params_from_dict
    from tests.trained import BASE

    return params_from_dict({"storage": {"cache_dir": str(cache_dir)}, "model": {"tiny": {"base": str(BASE)}}})


@pytest.fixture(scope="session")
def new_people(tmp_path_factory):
    """24 people no run has trained on (another renderer seed), 12 photos each, embedded by the real dlib
    recognizer, all in the held-out split (one training-split person besides, which the split needs)."""
    from components.core.shards import PreparedData
    from components.train.testbed import write_testbed
    from tests.trained import NEW_PEOPLE, NEW_PEOPLE_SEED, NEW_PHOTOS

    root = tmp_path_factory.mktemp("new-people")
    write_testbed(root, identities=NEW_PEOPLE + 1, images_per_identity=NEW_PHOTOS, test_identities=NEW_PEOPLE,
                  embeddings="dlib", seed=NEW_PEOPLE_SEED)
    return PreparedData(root)


@pytest.fixture(scope="session")
def face_images_dir() -> Path:
    """insightface's wheel ships real photos: t1.jpg (6 people) and Tom_Hanks_54745.png."""
    import insightface

    return Path(insightface.__file__).parent / "data" / "images"


@pytest.fixture(scope="session")
def group_photo(face_images_dir) -> Path:
    return face_images_dir / "t1.jpg"


@pytest.fixture(scope="session")
def single_face_photo(face_images_dir) -> Path:
    return face_images_dir / "Tom_Hanks_54745.png"


@pytest.fixture(scope="module")
def module_cwd(tmp_path_factory) -> Path:
    """Run a module outside the repository: MLflow's local store writes ./mlruns, and the
    repository's params.yaml is not the test's configuration."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        yield cwd
