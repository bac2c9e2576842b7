"""The base stage with a stored, pretrained test-bed base: DynamicID takes its base as given.

The paper never trains SD1.5; the embedded default does the same with a tiny base trained once on a GPU from the
test bed's training split (``benchmarks/testbed_base.py``, its command and data hash in ``record.json``) and stored in
the repository. The stage then only checks and installs it as ``<train.base.output>/export``, so the chain's graph is
unchanged and ``-S train.base.pretrained=null`` trains a base from scratch instead.

The data hash is checked because the evaluation's people are held out only if the base never saw them: a base trained
on other data may have seen this data's test people.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from components.core.errors import UserError

if TYPE_CHECKING:
    from components.core.config import Params

log = logging.getLogger(__name__)

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "image_encoder")


def read_record(base: Path) -> dict:
    """The stored base's record (command, data hash, steps, device), after checking its layout is complete."""
    missing = [p for p in PARTS if not (base / p).is_dir()]
    if not base.is_dir() or missing:
        raise UserError(f"train.base.pretrained = {base}: not a stored base (missing {', '.join(missing) or base}); "
                        "set train.base.pretrained: null to train the base here")
    try:
        return json.loads((base / "record.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"train.base.pretrained = {base}: no readable record.json ({e})") from None


def locate(value: str) -> Path:
    """The stored base's directory: as given, else (a relative path missing here, e.g. a pod whose working directory
    is the data volume) the same path beside the installed ``model`` package, which ships model/testbed_base."""
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists():
        import model

        packaged = Path(model.__file__).resolve().parent.parent / path
        if packaged.exists():
            return packaged
    return path


def install_pretrained_base(params: "Params") -> int:
    """Check the stored base against the prepared data and write it as the stage's export, metrics and loss."""
    from components.core.shards import PreparedData

    base = locate(params.train.base.pretrained)
    record = read_record(base)
    data_hash = PreparedData(params.data.prepared).manifest.get("data_hash")
    if record.get("data_hash") != data_hash:
        raise UserError(
            f"train.base.pretrained = {base} was trained on data {str(record.get('data_hash'))[:12]}..., but "
            f"{params.data.prepared} is {str(data_hash)[:12]}...: that base may have seen this data's held-out "
            "people. Set train.base.pretrained: null to train the base on this data (dynamicid train --stage base)")
    from components.train.stage_run import _atomic_dir

    out = Path(params.train.base.output)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_dir(out / "export", lambda d: shutil.copytree(base, d))  # as the trained base is written
    losses = record.get("unet_loss") or []
    (out / "loss.tsv").write_text("step\tloss\n" + "".join(f"{s}\t{v:.6f}\n" for s, v in losses))
    metrics = {"pretrained": 1, "steps": record.get("steps", 0), "vae_steps": record.get("vae_steps", 0),
               "images_seen": record.get("steps", 0) * record.get("batch", 0)}
    if losses:  # the names the trained stages' metrics use (the summary reads them)
        metrics.update(loss_first=losses[0][1], loss_final=losses[-1][1])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("train --stage base: installed the pretrained base %s (%s steps on %s, %s; data %s...)", base,
             record.get("steps"), record.get("device"), record.get("created"), str(data_hash)[:12])
    print(f"train base: pretrained base {base} installed as {out / 'export'} "
          f"({record.get('steps')} UNet steps at batch {record.get('batch')} on {record.get('device')}; "
          f"rebuild: {record.get('command')})", flush=True)
    return 0
