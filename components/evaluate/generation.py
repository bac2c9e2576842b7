"""Generation of the evaluation set: every case with ID injection on, every (prompt, seed) baseline with it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from components.evaluate.evalset import EvalSet, resolved_id_scale, user_boxes

if TYPE_CHECKING:
    from PIL import Image

    from components.core.config import Params


@dataclass
class Generated:
    image: "Image.Image"
    regions: list[list[float]]  # per person (y0, x0, y1, x1) the pipeline used


def generate(pipe, evalset: EvalSet, params: "Params") -> tuple[list[Generated], dict[tuple[str, int], "Image.Image"]]:
    """Run every case (ID on) and every baseline (ID off), batched by identity count and layout."""
    from tqdm import tqdm

    from model.pipeline import IdentityInput

    ev = params.evaluate
    id_scale = resolved_id_scale(params)
    common = dict(negative_prompt=ev.negative_prompt, num_inference_steps=ev.steps,
                  guidance_scale=ev.guidance_scale)
    buckets: dict[tuple[int, str | None], list[int]] = {}
    for idx, job in enumerate(evalset.jobs):
        buckets.setdefault((len(job.refs), job.layout), []).append(idx)
    batches = [idxs[i:i + ev.batch_size] for idxs in buckets.values() for i in range(0, len(idxs), ev.batch_size)]
    base_keys = evalset.baselines()
    base_batches = [base_keys[i:i + ev.batch_size] for i in range(0, len(base_keys), ev.batch_size)]
    results: list[Generated | None] = [None] * len(evalset.jobs)
    baselines: dict[tuple[str, int], Image.Image] = {}
    with tqdm(total=len(evalset.jobs) + len(base_keys), desc="evaluate: generating", unit="img") as bar:
        for batch in batches:
            jobs = [evalset.jobs[i] for i in batch]
            lay = jobs[0].layout  # "boxes": user_boxes, "strips": asked, None: the pipeline's default (auto)
            boxes = user_boxes(len(jobs[0].refs)) if lay == "boxes" else [None] * len(jobs[0].refs)
            ids = [[IdentityInput(image=evalset.references[r].image, expression=j.edit, bbox=boxes[p],
                                  driving_image=None if j.driver is None else evalset.drivers[j.driver].image)
                    for p, r in enumerate(j.refs)] for j in jobs]
            out = pipe([j.prompt for j in jobs], ids, seed=[j.seed for j in jobs], id_scale=id_scale,
                       layout="strips" if lay == "strips" else None, **common)
            for b, i in enumerate(batch):
                results[i] = Generated(out.images[b], [r.region for r in out.identities[b]])
            bar.update(len(batch))
        for keys in base_batches:
            out = pipe([k[0] for k in keys], [], seed=[k[1] for k in keys], **common)
            baselines.update(zip(keys, out.images))
            bar.update(len(keys))
    return [r for r in results if r is not None], baselines
