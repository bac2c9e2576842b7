"""Per-profile defaults: what changes with ``model.profile`` (the training schedule, precision, evaluation settings).

The schema's own defaults are the embedded ``tiny`` profile. Choosing ``sd15`` must be enough to get a run that can
finish (``dvc exp run -S model.profile=sd15``, or a cluster params file that sets only the profile and its paths), so
the sd15 schedule of method.md lives here, not in every params file. Precedence, lowest first:

    schema defaults < PROFILE_DEFAULTS[profile] < params file ``profiles.<profile>`` < params file top level < -S

so a value written at a params file's top level is always the user's decision, and ``profiles.<profile>`` holds the
values that should follow the profile (params.yaml keeps the tiny schedule and gate there, beside sd15's schedule).
Mappings merge key by key, except ``WHOLE_VALUES`` (the gate's threshold sets), which a higher layer replaces.
"""

from __future__ import annotations

from typing import Any

PROFILES = ("tiny", "sd15")

# method.md (release defaults): AdamW, lr 1e-4, weight decay 1e-2, batch 8 per GPU, 512 px, bf16. Steps sized for a
# real data set of ~100k images on 2 x 8 GPUs: stage 1 20k steps x 8 x 16 = 2.6M samples (~25 epochs), stage 2
# 10k steps. Evaluation with the paper's 30+ DDIM steps and a real CLIP for CLIP-T; edits read with the landmark rule,
# since real photos carry no ground-truth expression labels for the trained reader (docs/evaluation.md).
PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "sd15": {
        "train": {
            "precision": "bf16",
            "weight_decay": 0.01,
            "anchor": {"steps": 20000, "lr": 1.0e-4, "micro_batch": 8, "warmup_steps": 500},
            "reconfigure": {"steps": 10000, "lr": 1.0e-4, "micro_batch": 4, "warmup_steps": 500},
        },
        "evaluate": {"steps": 30, "clip_model": "/models/clip-vit-large-patch14", "motion_reader": "landmarks",
                     "prompts": ["a photo of a person", "a portrait of a person outdoors"],
                     "multi_prompts": ["a photo of {count} people"]},
        # Real photos, read back with insightface: a SD1.5 portrait nearly always holds a face its detector finds,
        # so a missed face is a defect, not the detector's limit (the tiny profile's 64 px faces allow 0.8); ArcFace
        # puts different people near 0 cosine, so an identity lift that cannot be told from 0.1 keeps no identity.
        "gate": {
            "minimums": {"single.detection_rate": 0.95, "edit.detection_rate": 0.9, "drive.detection_rate": 0.9},
            "maximums": {"multi2.missing_rate": 0.1, "multi2.confusion_rate": 0.1},
            "interval_above": {"single.id_lift": 0.1, "edit.pose_error_gain": 0.0,
                               "edit.expression_agreement_gain": 0.0, "drive.pose_error_gain": 0.0},
        },
    },
}

# Values that are one decision, not a set of defaults to add to: a params file that writes gate.minimums (at the top
# level or with -S) gets exactly those minimums, not the profile's others merged in.
WHOLE_VALUES = (("gate", "minimums"), ("gate", "maximums"), ("gate", "interval_above"), ("gate", "max_regression"))


def merge(base: dict, extra: dict, _path: tuple[str, ...] = ()) -> dict:
    """``extra`` over ``base``, recursively for mappings, except at WHOLE_VALUES, where ``extra``'s value replaces."""
    out = dict(base)
    for k, v in extra.items():
        here = (*_path, k)
        nested = isinstance(v, dict) and isinstance(out.get(k), dict) and here not in WHOLE_VALUES
        out[k] = merge(out[k], v, here) if nested else v
    return out


def chosen_profile(raw: dict, overrides: dict) -> str:
    """The profile an -S override, else the file, else the schema chooses."""
    for tree in (overrides, raw):
        model = tree.get("model")
        if isinstance(model, dict) and model.get("profile") is not None:
            return str(model["profile"])
    return "tiny"


def profile_layer(raw: dict, profile: str) -> dict:
    """PROFILE_DEFAULTS[profile] with the params file's ``profiles.<profile>`` over it."""
    section = raw.get("profiles") or {}
    if not isinstance(section, dict):
        raise ValueError("profiles: must be a mapping of profile name -> settings")
    unknown = sorted(set(section) - set(PROFILES))
    if unknown:
        raise ValueError(f"profiles: unknown profile {unknown[0]!r}; known: {', '.join(PROFILES)}")
    own = section.get(profile) or {}
    if not isinstance(own, dict):
        raise ValueError(f"profiles.{profile}: must be a mapping of sections")
    if "profiles" in own or "profile" in (own.get("model") or {}):
        raise ValueError(f"profiles.{profile}: may not set the profile itself")
    return merge(PROFILE_DEFAULTS.get(profile, {}), own)
