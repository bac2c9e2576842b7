"""The base stage with a stored pretrained base (train.base.pretrained): installed as the stage's export when its
data hash matches the prepared data, refused with the reason when it does not (that base may have seen this data's
held-out people), and refused when the directory is not a complete stored base. Nothing is trained either way."""

from __future__ import annotations

import json
import shutil

import pytest
import torch.distributed as dist

from components.cli import main
from components.core.shards import PreparedData
from components.train.testbed import write_testbed
from model.backbone import load_backbone, tiny_base_dir


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    write_testbed(root, identities=3, images_per_identity=2, test_identities=1)
    return root


@pytest.fixture
def stored(tmp_path, prepared, tiny_params, cache_dir):
    """A stored base in the repository's layout: the seeded tiny base plus a record for ``prepared``'s data."""
    base = tmp_path / "stored"
    shutil.copytree(tiny_base_dir(tiny_params.model.tiny, cache_dir), base)
    record = {"command": "python -m benchmarks.testbed_base train --data x --out y", "steps": 7, "batch": 3,
              "vae_steps": 2, "device": "test", "data_hash": PreparedData(prepared).manifest["data_hash"],
              "unet_loss": [[5, 0.5], [7, 0.25]]}
    (base / "record.json").write_text(json.dumps(record))
    return base


def _base(tmp_path, prepared, stored, capsys=None):
    out = tmp_path / "runs" / "base"
    code = main(["-S", f"data.prepared={prepared}", "-S", f"train.base.output={out}",
                 "-S", f"train.base.pretrained={stored}", "train", "--stage", "base"])
    return code, out


def test_a_matching_stored_base_is_installed_as_the_export(tmp_path, prepared, stored):
    code, out = _base(tmp_path, prepared, stored)
    assert code == 0
    bb = load_backbone(out / "export")  # loads like a trained base, every part present
    assert bb.unet is not None and (out / "export" / "record.json").exists()
    assert json.loads((out / "metrics.json").read_text()) == {
        "pretrained": 1, "steps": 7, "vae_steps": 2, "images_seen": 21, "loss_first": 0.5, "loss_final": 0.25}
    assert (out / "loss.tsv").read_text().splitlines() == ["step\tloss", "5\t0.500000", "7\t0.250000"]
    assert not dist.is_initialized() and not (out / "checkpoints").exists()  # nothing trained


def test_a_base_from_other_data_is_refused_with_the_reason(tmp_path, prepared, stored, capsys):
    record = json.loads((stored / "record.json").read_text())
    (stored / "record.json").write_text(json.dumps({**record, "data_hash": "0" * 64}))
    code, out = _base(tmp_path, prepared, stored)
    err = capsys.readouterr().err
    assert code == 2 and "may have seen this data's held-out people" in err and "train.base.pretrained" in err
    assert not (out / "export").exists()


def test_an_incomplete_stored_base_is_refused(tmp_path, prepared, stored, capsys):
    shutil.rmtree(stored / "vae")
    code, out = _base(tmp_path, prepared, stored)
    assert code == 2 and "missing vae" in capsys.readouterr().err and not (out / "export").exists()
    (stored / "record.json").unlink()
    shutil.copytree(stored / "unet", stored / "vae")
    code, _ = _base(tmp_path, prepared, stored)
    assert code == 2 and "no readable record.json" in capsys.readouterr().err


def test_the_shipped_relative_path_is_found_from_any_working_directory(tmp_path, monkeypatch):
    """Pods run in the data volume: model/testbed_base is then found beside the installed model package."""
    from components.train.pretrained_base import locate, read_record

    monkeypatch.chdir(tmp_path)
    found = locate("model/testbed_base")
    assert found.is_absolute() and read_record(found)["data_hash"]
    assert locate(str(tmp_path / "none")) == tmp_path / "none"
