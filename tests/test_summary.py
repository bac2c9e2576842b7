"""``dynamicid summary`` (the end of `make run`) reads the stages' outputs back correctly.

The dvc chain test runs it on real outputs; here each part of the text is checked on small
hand-written outputs, including stages that have not run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.cli import main

pytestmark = pytest.mark.usefixtures("module_cwd")  # outputs under runs/ of a temporary directory


def write(path: str, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(data if isinstance(data, str) else json.dumps(data))


@pytest.fixture()
def outputs(module_cwd):
    import shutil

    shutil.rmtree("runs", ignore_errors=True)
    write("runs/base/metrics.json", {"loss_first": 0.9, "loss_final": 0.3, "steps": 200.0})
    write("runs/anchor/metrics.json", {"loss_first": 0.36, "loss_final": 0.35, "steps": 200.0, "id_gain": 3e-4,
                                       "id_gain_low": 1e-4, "id_gain_high": 5e-4, "id_gain_people": 6.0,
                                       "id_passed": 1.0})
    write("runs/evaluate/metrics.json", {"single": {"id_similarity": 0.42, "clip_t": 0.25, "id_lift": 0.12,
                                                    "id_lift_low": 0.05, "id_lift_high": 0.2},
                                         "multi2": {"id_similarity": 0.31}})
    write("runs/evaluate/report.json", {"grids": ["grids/single-000.png"], "profile": "tiny",
                                        "not_measured": ["multi2.confusion_rate"]})
    write("runs/register/registration.json", {"model": "dynamicid", "registered": True, "version": "7",
                                              "aliases": ["candidate", "champion"], "gate": {"passed": True}})
    yield


def test_text_names_losses_checks_metrics_grids_version_and_next_commands(outputs, capsys):
    assert main(["-S", "gate.promote=true", "summary"]) == 0  # as params.yaml sets it
    out = capsys.readouterr().out
    assert "base         loss 0.9000 -> 0.3000 over 200 steps; export runs/base/export" in out
    assert "gain 0.0003 [0.0001, 0.0005] over 6 held-out people: PASS" in out
    assert "single.id_lift                     0.1200  95% interval [0.0500, 0.2000]" in out
    assert "reconfigure  not run" in out
    assert "single.id_similarity" in out and "0.4200" in out
    assert "multi2.confusion_rate              not measured" in out
    assert "edit.pose_error" not in out  # neither measured nor reported as missing: the stage had no edits
    assert "runs/evaluate/grids/single-000.png" in out and "tiny profile" in out
    assert "dynamicid version 7 (@candidate, @champion" in out
    assert "dynamicid serve --model-uri models:/dynamicid@champion" in out


def test_a_failed_check_and_a_rejected_model_are_said_with_their_reasons(outputs, capsys):
    write("runs/reconfigure/metrics.json", {"loss_first": 0.7, "loss_final": 0.03, "steps": 50.0, "imr_gain": 1e-3,
                                            "imr_gain_low": -1e-3, "imr_gain_high": 3e-3, "imr_passed": 0.0})
    check = {"metric": "single.id_lift", "check": "interval above", "value": 0.0, "limit": 0.0, "margin": 0.0,
             "passed": False, "note": "the interval includes 0: no effect shown", "low": 0.0, "high": 0.0}
    write("runs/register/registration.json", {"model": "dynamicid", "registered": False,
                                              "gate": {"passed": False, "checks": [check]}})
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    assert "gain 0.001 [-0.001, 0.003]: FAIL" in out
    assert "nothing registered: the gate rejected the model (1 criteria failed" in out
    assert ("- single.id_lift = 0.0000 (95% interval [0.0000, 0.0000]), needs interval > 0.0000: the interval "
            "includes 0: no effect shown") in out
    assert "dynamicid serve" not in out


def test_candidate_alias_only(outputs, capsys):
    write("runs/register/registration.json", {"model": "dynamicid", "registered": True, "version": "3",
                                              "aliases": ["candidate"], "gate": {"passed": True}})
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    assert "(@candidate;" in out and "models:/dynamicid@candidate" in out


def test_nothing_run_yet(module_cwd, capsys):
    import shutil

    shutil.rmtree("runs", ignore_errors=True)
    assert main(["summary", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {k: v["status"] for k, v in got["stages"].items()} == dict.fromkeys(("base", "anchor", "reconfigure"),
                                                                                "not run")
    assert got["evaluation"] is None and got["registered"] is None


def test_a_damaged_output_is_named_not_reported_as_missing(outputs, capsys):
    write("runs/anchor/metrics.json", '{"loss_first": 0.3')
    assert main(["summary"]) == 2
    assert "runs/anchor/metrics.json is not valid JSON" in capsys.readouterr().err


def test_the_stored_base_is_said_to_be_installed_not_trained(outputs, capsys):
    # what components.train.pretrained_base writes (tests/test_pretrained_base.py)
    write("runs/base/metrics.json", {"pretrained": 1, "steps": 4373, "vae_steps": 1500, "images_seen": 1119488,
                                     "loss_first": 0.61, "loss_final": 0.33})
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    assert ("base         loss 0.6100 -> 0.3300 over 4373 steps; export runs/base/export (the stored base: "
            "installed, not trained here)") in out
    assert "anchor       loss 0.3600 -> 0.3500 over 200 steps; export runs/anchor/export\n" in out
