"""params.yaml loading: validation names the bad key path and the allowed values."""

from __future__ import annotations

import pytest
import yaml

from components.cli import main
from components.core.config import ParamsError, flatten, load_params, params_from_dict, params_hash, parse_overrides


def test_defaults_are_the_embedded_profile():
    p = params_from_dict({})
    assert p.model.profile == "tiny"
    assert p.face.resolved_backend("tiny") == "dlib"
    assert p.face.resolved_backend("sd15") == "insightface"
    assert p.model.active is p.model.tiny
    assert p.model.saa.gating is True  # query gating on by default (the research release has it off)


def test_unknown_key_names_path_and_allowed_keys():
    with pytest.raises(ParamsError) as err:
        params_from_dict({"model": {"saa": {"taus": 0.2}}})
    msg = str(err.value)
    assert "model.saa.taus: unknown key" in msg
    assert "tau" in msg and "boost_steps" in msg


def test_bad_value_names_path_and_allowed_values():
    with pytest.raises(ParamsError) as err:
        params_from_dict({"model": {"profile": "sdxl"}})
    assert "model.profile" in str(err.value) and "'tiny' or 'sd15'" in str(err.value)
    with pytest.raises(ParamsError, match=r"model.tiny.resolution"):
        params_from_dict({"model": {"tiny": {"resolution": 60}}})
    with pytest.raises(ParamsError, match=r"model.saa.tau"):
        params_from_dict({"model": {"saa": {"tau": 1.5}}})


def test_overrides_parse_yaml_values_and_switch_profile(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"model": {"max_ids": 3}}))
    p = load_params(f, ["model.profile=sd15", "model.saa.gating=false"])
    assert p.model.profile == "sd15" and p.model.saa.gating is False and p.model.max_ids == 3
    assert p.model.active.lora_rank == 128
    assert parse_overrides(["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}
    with pytest.raises(ParamsError):
        parse_overrides(["novalue"])


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_hash_and_flatten_are_stable():
    a, b = params_from_dict({}), params_from_dict({"model": {"profile": "tiny"}})
    assert params_hash(a) == params_hash(b)
    assert params_hash(a) != params_hash(params_from_dict({"model": {"max_ids": 2}}))
    flat = flatten(a)
    assert flat["model.saa.tau"] == 0.3


def test_repo_params_yaml_validates():
    p = load_params("params.yaml")
    assert p.model.profile in ("tiny", "sd15")


def test_cli_params_command(capsys):
    assert main(["-S", "model.max_ids=2", "params", "--section", "model"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["max_ids"] == 2
    assert main(["-S", "model.maxids=2", "params"]) == 2
    assert "model.maxids: unknown key" in capsys.readouterr().err


def test_partial_profile_section_keeps_profile_defaults():
    p = params_from_dict({"model": {"tiny": {"imr": {"landmark_size": 48}, "face_encoder": {"depth": 3}}}})
    assert p.model.tiny.imr.width == 64 and p.model.tiny.imr.landmark_size == 48
    assert p.model.tiny.face_encoder.heads == 2 and p.model.tiny.face_encoder.depth == 3
    assert p.model.sd15.imr.width == 1024


def test_on_and_off_are_options_not_booleans(tmp_path):
    """YAML 1.1 reads off/on/yes/no as booleans; params (like DVC) read YAML 1.2, so options keep their names."""
    from components.core.config import load_params

    p = load_params(None, ["train.compile_unet=off", "serve.fast_path=off", "gate.promote=yes",
                           "model.saa.gating=false"])
    assert p.train.compile_unet == "off" and p.serve.fast_path == "off"
    assert p.gate.promote is True and p.model.saa.gating is False  # pydantic still takes yes / false for a bool
    f = tmp_path / "params.yaml"
    f.write_text("train:\n  compile_unet: on\n")
    assert load_params(f).train.compile_unet == "on"


def test_the_profile_alone_selects_its_schedule_and_evaluation():
    """`-S model.profile=sd15` on the repo's params.yaml switches the training schedule, precision and evaluation;
    a value written at the top level, or given with -S, still wins over the profile's."""
    tiny = load_params("params.yaml")
    assert (tiny.train.precision, tiny.train.anchor.steps, tiny.train.anchor.lr, tiny.evaluate.steps) == (
        "fp32", 200, 3e-4, 8)
    sd15 = load_params("params.yaml", ["model.profile=sd15"])
    assert sd15.train.precision == "bf16" and sd15.train.weight_decay == 0.01
    assert (sd15.train.anchor.steps, sd15.train.anchor.lr, sd15.train.anchor.micro_batch) == (20000, 1e-4, 8)
    assert sd15.evaluate.clip_model and sd15.evaluate.steps == 30 and sd15.evaluate.motion_reader == "landmarks"
    assert sd15.train.anchor.output == "runs/anchor"  # what does not follow the profile stays
    mine = load_params("params.yaml", ["model.profile=sd15", "train.anchor.lr=2e-4"])
    assert mine.train.anchor.lr == 2e-4 and mine.train.anchor.steps == 20000


def test_profile_defaults_in_code_match_params_yaml_and_complete_a_minimal_file(tmp_path):
    """A params file that only names the profile (the cluster's) gets the same sd15 settings as params.yaml."""
    from components.core.config.profiles import PROFILE_DEFAULTS

    assert yaml.safe_load(open("params.yaml"))["profiles"]["sd15"] == PROFILE_DEFAULTS["sd15"]
    minimal = load_params("k8s/base/params-cluster.yaml")
    full = load_params("params.yaml", ["model.profile=sd15"])
    for key in ("precision", "weight_decay"):
        assert getattr(minimal.train, key) == getattr(full.train, key)
    assert minimal.train.anchor == full.train.anchor and minimal.train.reconfigure == full.train.reconfigure
    assert minimal.evaluate.clip_model == full.evaluate.clip_model
    f = tmp_path / "params.yaml"
    f.write_text("model:\n  profile: sd15\ntrain:\n  precision: fp32\n")
    assert load_params(f).train.precision == "fp32"  # the file's own top-level value wins


def test_bad_profile_sections_name_their_key_path():
    with pytest.raises(ParamsError, match=r"profiles.sd15.train.anchr: unknown key"):
        params_from_dict({"profiles": {"sd15": {"train": {"anchr": {}}}}})
    with pytest.raises(ParamsError, match="unknown profile 'sd21'"):
        params_from_dict({"profiles": {"sd21": {}}})
    with pytest.raises(ParamsError, match="may not set the profile itself"):
        params_from_dict({"profiles": {"tiny": {"model": {"profile": "sd15"}}}})


def test_the_gate_follows_the_profile_and_a_written_threshold_set_replaces_it(tmp_path):
    """sd15 is gated for real photos by the profile alone (the cluster's file names nothing else); a threshold set
    written at the top level or with -S is taken whole, not merged with the profile's other thresholds."""
    tiny = load_params("params.yaml")
    sd15 = load_params("params.yaml", ["model.profile=sd15"])
    assert tiny.gate.minimums["single.detection_rate"] == 0.8 and tiny.gate.interval_above["single.id_lift"] == 0.0
    assert sd15.gate.minimums["single.detection_rate"] == 0.95 and sd15.gate.interval_above["single.id_lift"] == 0.1
    assert sd15.gate.maximums["multi2.confusion_rate"] < tiny.gate.maximums["multi2.confusion_rate"]
    cluster = load_params("k8s/base/params-cluster.yaml").gate
    assert (cluster.minimums, cluster.maximums, cluster.interval_above) == (
        sd15.gate.minimums, sd15.gate.maximums, sd15.gate.interval_above)
    mine = load_params("params.yaml", ['gate.minimums={"single.people": 1}'])
    assert mine.gate.minimums == {"single.people": 1.0} and mine.gate.maximums == tiny.gate.maximums
    f = tmp_path / "params.yaml"
    f.write_text("model:\n  profile: sd15\ngate:\n  interval_above:\n    single.id_lift: 0.2\n")
    written = load_params(f)
    assert written.gate.interval_above == {"single.id_lift": 0.2} and written.gate.minimums == sd15.gate.minimums
    again = load_params(f, ['gate.interval_above={"edit.pose_error_gain": 0.0}'])
    assert again.gate.interval_above == {"edit.pose_error_gain": 0.0}
