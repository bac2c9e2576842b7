"""Sample grids of ``dynamicid evaluate``: per kind, reference | generated | baseline (or unedited | edited) pages.
"""

from __future__ import annotations

from pathlib import Path

from components.evaluate.evalset import EvalSet
from components.evaluate.generation import Generated


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def write_grids(evalset: EvalSet, generated: list[Generated], baselines: dict, rows: list[dict], out_dir: Path,
                grid_rows: int, cell: int) -> list[Path]:
    """PNG pages per kind: references | generated | another person's photo (the control) | ID off for single
    cases; references | generated | ID off for multi-ID; reference | unedited | edited for text edits; reference |
    driving photo | unedited | edited for landmark edits. A caption under each row gives seed, similarities to the
    reference and CLIP-T; the control's rows are shown beside their case."""
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    font = _font()
    caption_h, header_h = 28, 16
    by_job: dict[int, list[dict]] = {}
    for r in rows:
        by_job.setdefault(r["job"], []).append(r)
    single_index = {(j.refs, j.prompt, j.seed): i for i, j in enumerate(evalset.jobs) if j.kind == "single"}
    control = {(j.against, j.prompt, j.seed): i for i, j in enumerate(evalset.jobs) if j.kind == "shuffled"}
    written: list[Path] = []
    kinds = [k for k in dict.fromkeys(j.kind for j in evalset.jobs) if k != "shuffled"]
    for kind in kinds:
        idxs = [i for i, j in enumerate(evalset.jobs) if j.kind == kind]
        n = len(evalset.jobs[idxs[0]].refs)
        if kind == "edit":
            shown = ["unedited", "edited"]
        elif kind == "drive":
            shown = ["driving photo", "unedited", "edited"]
        elif kind == "single" and control:
            shown = ["generated", "other's photo", "ID off"]
        else:
            shown = ["generated", "ID off"]
        titles = [f"reference {k + 1}" for k in range(n)] + shown
        for page, start in enumerate(range(0, len(idxs), grid_rows)):
            chunk = idxs[start:start + grid_rows]
            sheet = Image.new("RGB", (cell * len(titles), header_h + len(chunk) * (cell + caption_h)), "white")
            draw = ImageDraw.Draw(sheet)
            for c, t in enumerate(titles):
                draw.text((c * cell + 3, 2), t, fill="black", font=font)
            name = f"{kind}-{page:03d}.png"
            for row_no, i in enumerate(chunk):
                job = evalset.jobs[i]
                y = header_h + row_no * (cell + caption_h)
                tiles = [Image.fromarray(evalset.references[r].image) for r in job.refs]
                if kind in ("edit", "drive"):
                    if kind == "drive":
                        tiles.append(Image.fromarray(evalset.drivers[job.driver].image))
                    tiles += [generated[single_index[(job.refs, job.prompt, job.seed)]].image, generated[i].image]
                else:
                    c_i = control.get((job.refs[0], job.prompt, job.seed)) if kind == "single" else None
                    tiles += [generated[i].image] + ([generated[c_i].image] if c_i is not None else [])
                    tiles += [baselines[(job.prompt, job.seed)]]
                for c, tile in enumerate(tiles):
                    sheet.paste(tile.convert("RGB").resize((cell, cell), Image.BICUBIC), (c * cell, y))
                if kind.startswith("multi"):  # the regions the layout used, outlined on the generated image
                    for y0, x0, y1, x1 in generated[i].regions:
                        draw.rectangle([(n + x0) * cell, y + y0 * cell, (n + x1) * cell - 1, y + y1 * cell - 1],
                                       outline="red")
                jr = by_job[i]
                first = next(r for r in jr if r["variant"] in ("id", "edit"))
                sims = "/".join(f"{r['id_similarity']:.2f}" for r in jr if r["variant"] in ("id", "edit"))
                base = "/".join(f"{r['id_similarity']:.2f}" for r in jr if r["variant"] in ("baseline", "unedited"))
                label = job.edit if kind == "edit" else (
                    f"to {evalset.drivers[job.driver].key}: {evalset.drivers[job.driver].expression}, "
                    f"yaw {evalset.drivers[job.driver].yaw:+.0f}" if kind == "drive" else job.prompt)
                other = ""
                if kind == "single" and c_i is not None:
                    other = " other " + "/".join(f"{r['id_similarity']:.2f}" for r in by_job[c_i])
                    for r in by_job[c_i]:
                        r["grid"], r["grid_row"] = name, row_no
                draw.text((3, y + cell + 1), f"seed {job.seed}  sim {sims}{other} (off {base})  "
                          f"clip {first['clip_t']:.3f}", fill="black", font=font)
                draw.text((3, y + cell + 14), label[:90], fill="dimgray", font=font)
                for r in jr:
                    r["grid"], r["grid_row"] = name, row_no
            sheet.save(out_dir / name)
            written.append(out_dir / name)
    return written
