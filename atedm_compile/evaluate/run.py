"""``evaluate``: the paper's FID / CLIP evaluation of pruning methods on a pipeline, sharded over ranks.

Work unit: a *chunk*, ``batch`` consecutive captions of one run (method, budget, guidance scale).
Chunks are dealt to ranks round-robin (chunk ``c`` to rank ``c % world``) and a chunk's images
are generated together, so every image comes out of the same batch, with the same per-caption
noise (seed + caption index, CPU generator), whatever the number of ranks: the table does not
depend on it. Each chunk leaves its images (``images/<run>/<index>.png``) and the features of
those images (``features/<run>/<chunk>.safetensors``), each written atomically; a rerun skips a
chunk whose features are there, and computes features from the images where only those are.
Features are gathered on rank 0 (``all_gather_object``), which computes the metrics and writes
the table (``results.txt``), every number (``results.json``) and the curves (``curves.png``).

By job: ``config.py`` (``EvaluateConfig``, the runs), ``records.py`` (what the output folder
records, and the checks a rerun passes), ``chunks.py`` (a run's chunks: images and features),
``reference.py`` (the real images' statistics); here, the command that puts them together.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..devices import dtype_name, resolve_dtype
from ..files import write_atomically
from . import report, shards
from .captions import read_captions
from .chunks import _chunks, _fid, _merge, _run_chunks
from .config import EvaluateConfig, _runs
from .metrics import Metrics, paper_metrics
from .records import _caption_records, _prepare
from .reference import _reference_files, _reference_statistics, read_reference_stats
from .reference import reference_image  # noqa: F401 (its import path before the split)


# -- the command -------------------------------------------------------------------------------

def evaluate(config: EvaluateConfig, metrics: Metrics | Callable[[torch.device], Metrics] | None = None) -> dict:
    """Generate every run's images, measure FID and the CLIP score, write the table, JSON and curves.

    Runs alone or in each process ``torchrun`` starts (they share the work, see the module
    docstring). ``metrics``: a ``Metrics``, or a factory called with this rank's device that
    returns one; default ``paper_metrics`` (clean-fid Inception, OpenCLIP ViT-g-14).

    Returns what ``results.json`` holds, on every rank.

    Example (the shipped toy model, a metrics factory of your own):
        >>> from atedm_compile.evaluate import EvaluateConfig, evaluate  # doctest: +SKIP
        >>> record = evaluate(EvaluateConfig("tiny-shapes", "captions.txt", "out/eval", methods=["full", "atedm"],
        ...                                  keep_ratios=[0.5], steps=4, reference="shapes/"),
        ...                   metrics=my_metrics)  # doctest: +SKIP
        >>> [(r["method"], r["fid"], r["clip_score"]) for r in record["rows"]]  # doctest: +SKIP
    """
    config.check()
    captions = read_captions(config.captions)
    if config.images is not None:
        if config.images > len(captions):
            raise ValueError(f"images={config.images}: {config.captions} holds only {len(captions)} captions")
        captions = captions[:config.images]
    elif len(captions) < 2:
        raise ValueError(f"{config.captions} holds {len(captions)} caption; FID needs two or more")
    if config.reference_stats is not None:
        read_reference_stats(config.reference_stats)  # a bad file: said before anything is made
    shard = shards.start(config.device)
    try:
        return _evaluate(config, metrics, _caption_records(captions, config.seed), shard)
    finally:
        shards.finish(shard)


def _evaluate(config: EvaluateConfig, metrics, captions: list[dict], shard) -> dict:
    from tqdm import tqdm

    from ..models import load_pipeline
    from ..sizes import preflight

    device = shard.device
    if metrics is None:
        metrics = paper_metrics(device)
    elif not isinstance(metrics, Metrics) and callable(metrics):
        made = metrics(device)
        if not isinstance(made, Metrics):
            raise ValueError(f"the metrics factory {getattr(metrics, '__name__', metrics)!r} returned "
                             f"{type(made).__name__}, not an atedm_compile.evaluate.Metrics")
        metrics = made
    dtype = (resolve_dtype(config.dtype) if config.dtype != "auto"
             else torch.float16 if device.type == "cuda" else torch.float32)
    pipe = load_pipeline(config.model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    vae_config = dict(pipe.vae.config) if getattr(pipe, "vae", None) is not None else None
    height, width, vae_factor = preflight(
        dict(pipe.unet.config), vae_config, config.height, config.width, config.batch,
        vae_factor=getattr(pipe, "vae_scale_factor", 8), precision=dtype_name(dtype),
        device=str(device))
    size = {"height": height, "width": width}
    out = Path(config.out)
    settings = {"model": config.model, "steps": config.steps, "seed": config.seed, "batch": config.batch, **size,
                "dtype": str(pipe.unet.dtype).removeprefix("torch."), "device": device.type}
    plan = shard.from_rank0(lambda: _prepare(out, settings, captions, config, dict(pipe.unet.config),
                                             dict(size, vae_factor=vae_factor)))
    runs = _runs(config, plan)

    chunks = _chunks(len(captions), config.batch)
    reference_files = [] if config.reference is None else _reference_files(Path(config.reference))
    reference_chunks = len(shard.mine(len(_chunks(len(reference_files), config.batch))))
    counts: Counter = Counter()
    progress = tqdm(total=len(runs) * len(shard.mine(len(chunks))) + reference_chunks, unit="chunk",
                    desc=f"rank 0 of {shard.world}: chunks of {config.batch}", disable=shard.rank != 0, file=sys.stderr)
    reference = _reference_statistics(config, reference_files, metrics, shard, out, size, counts, progress)
    measured, failure = [], None
    for run in runs:
        gathered = shard.gather(_run_chunks(run, pipe, metrics, captions, chunks, shard, out, size, config.steps,
                                            counts, progress))
        if shard.rank == 0 and failure is None:
            # An error here is raised in finish(), once every rank is there to hear of it.
            try:
                merged = _merge(gathered)
                measured.append((run, *_fid(merged["fid"], reference), merged["clip"]))
            except ValueError as error:
                failure = error
    progress.close()
    totals = sum((Counter(c) for c in shard.gather(dict(counts))), Counter())

    def finish():
        if failure is not None:
            raise failure
        rows = [{"run": run.name, "method": run.method, "budget": run.budget, "guidance": run.guidance,
                 "keep_ratio": run.plan["keep_ratio"], "capped": run.plan["capped"], "tmacs": run.plan["tmacs"],
                 "tmacs_with_scoring": run.plan["tmacs_with_scoring"], "share": run.plan["share"],
                 "share_with_scoring": run.plan["share_with_scoring"],
                 "images": len(clip), "fid": fid, "clip_score": float(np.mean(clip, dtype=np.float64))}
                for run, fid, _, clip in measured]
        record = {
            "settings": {**settings, "captions": str(config.captions), "images": len(captions),
                         "methods": list(config.methods), "budgets": list(config.budgets),
                         "keep_ratios": list(config.keep_ratios), "guidance": list(config.guidance),
                         "metrics": metrics.name, "frechet_distance": measured[0][2] if measured else None,
                         "reference": {"kind": reference["kind"], "path": reference["path"], "images": reference["images"]},
                         "units": {"tmacs": "TMACs of one U-Net call on the CFG pair, averaged over the schedule's steps",
                                   "clip_score": "mean cosine of each image's embedding and its caption's (the paper's 0-1 scale)"}},
            "plan": plan,
            "rows": rows,
            "clip_scores": {run.name: [float(x) for x in clip] for run, _, _, clip in measured},
        }
        text = report.table(rows)
        write_atomically(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))
        write_atomically(out / "results.txt", lambda tmp: Path(tmp).write_text(text))
        if rows:
            report.curves(rows, out / "curves.png", write_atomically)
        print(text, end="")
        print(f"images: {totals['images generated']} generated, {totals['images read back']} read back; features of "
              f"{totals['features reused']} images reused, {totals['reference features computed']} reference images "
              f"measured; ranks: {shard.world}")
        print(f"wrote {out / 'results.txt'}, {out / 'results.json'} and {out / 'curves.png'}")
        return record

    return shard.from_rank0(finish)
