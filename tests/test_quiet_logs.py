"""Quiet logs (issue 17, item 5): a normal load prints no library notice a user can do nothing about, while any other
warning still shows (model/notices.py, model/loading.quiet_hf_progress)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks.gpu_check_models import write_sd15

NOTICES = ("accelerate", "float32", "torchvision", "ORJSONResponse", "Writing model shards", "Loading weights",
           "were passed to", "deprecated")


def test_an_sd15_load_as_the_cli_runs_it_prints_nothing(tmp_path: Path) -> None:
    """An SD1.5-structured folder as released (PNDM scheduler config) and a single-file checkpoint, loaded in a fresh
    process with the CLI's logging setup (INFO on the root logger, Python warnings on): stderr holds only our own
    INFO line about the one-time conversion."""
    files = write_sd15(tmp_path / "sd15", "shaped")
    sched = files["diffusers"] / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    cfg.update({"_class_name": "PNDMScheduler", "set_alpha_to_one": False, "skip_prk_steps": True,
                "trained_betas": None})
    sched.write_text(json.dumps(cfg))
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=32)).save_pretrained(tmp_path / "enc")
    script = textwrap.dedent(f"""
        import logging, warnings
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.captureWarnings(True)
        warnings.simplefilter("default")
        from model import single_file
        from model.config import ModelParams
        from model.loading import load_backbone_for
        single_file.SD15_CONFIG = single_file.Path({str(files["config"])!r})
        for base in ({str(files["diffusers"])!r}, {str(files["safetensors"])!r}):
            params = ModelParams(profile="sd15", sd15={{"base": base, "image_encoder": {str(tmp_path / "enc")!r},
                                                       "tokenizer": {str(files["tokenizer"])!r}}})
            bb = load_backbone_for(params, {str(tmp_path / "cache")!r})
            bb.unet.to(dtype=bb.unet.dtype)
        print("loaded")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "loaded", out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert all(ln.startswith("INFO model.single_file: converting the single-file checkpoint") for ln in lines), lines
    assert not any(n in out.stderr for n in NOTICES)


def test_library_notices_are_dropped_and_other_warnings_kept(capsys) -> None:
    script = textwrap.dedent("""
        import logging, warnings
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        warnings.simplefilter("default")
        from model.loading import quiet_hf_progress
        from diffusers.utils import logging as d_logging
        quiet_hf_progress()
        log = d_logging.get_logger("diffusers.models.modeling_utils")
        log.warning("Cannot initialize model with low cpu memory usage because `accelerate` was not found")
        log.warning("a diffusers warning that matters")
        warnings.warn("ORJSONResponse is deprecated, FastAPI now serializes data directly", DeprecationWarning)
        warnings.warn("a warning that matters", UserWarning)
        import numpy as np
        from insightface.utils import face_align
        from insightface.utils.face_align import arcface_dst
        face_align.norm_crop(np.zeros((112, 112, 3), np.uint8), arcface_dst)  # scikit-image's deprecation, inside
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert "a diffusers warning that matters" in out.stderr and "a warning that matters" in out.stderr
    assert "accelerate" not in out.stderr and "ORJSONResponse" not in out.stderr and "estimate" not in out.stderr
