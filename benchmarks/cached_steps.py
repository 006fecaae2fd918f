"""Speed-up and PSNR of cached steps (ours, ``atedm_compile.caching``) against the full model and
the ``DeepCache`` package's ``DeepCacheSDHelper`` on a shipped model.

Every method samples the same captions from the same noise (one caption per pipeline call, CFG);
the time is the process CPU time of the whole sampling run (text encoders, U-Net, VAE), each
method run ``--repeats`` times in turn and its fastest run kept. Run it on one thread:

    OMP_NUM_THREADS=1 nice python3 -m benchmarks.cached_steps --model tiny-shapes-xl
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from atedm_compile.caching import CacheState, cached_step, step_roles
from atedm_compile.config import DeepCacheConfig
from atedm_compile.files import write_atomically
from atedm_compile.models import load_pipeline
from atedm_compile.shapes.synthetic import psnr

CAPTIONS = (
    "a small yellow triangle at the bottom right on a checkered gray background",
    "a large blue circle in the center on a striped white background",
    "a small green square at the top on a plain red background",
    "a large red triangle on the left on a checkered blue background",
    "a large yellow circle at the top left on a plain gray background",
    "a small blue square on the right on a striped yellow background",
    "a large green triangle at the bottom on a plain white background",
    "a small red circle at the top right on a checkered green background",
)


def sample(pipe, captions, steps: int, guidance: float, size: int, seed: int) -> np.ndarray:
    images = []
    for i, caption in enumerate(captions):
        out = pipe(caption, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(seed + i), output_type="np")
        images.append((out.images[0] * 255).round().astype(np.uint8))
    return np.stack(images)


def with_ours(pipe, cache: DeepCacheConfig, steps: int, run):
    unet, roles, state, calls = pipe.unet, step_roles(cache, steps), CacheState(), [0]

    def forward(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True, **unused):
        step = calls[0] % steps  # one U-Net call per step; a new caption starts a new run
        if step == 0:
            state.reset()
        calls[0] += 1
        return (cached_step(unet, cache.branch, roles[step] == "full", state, sample, timestep,
                            encoder_hidden_states, added_cond_kwargs),)

    unet.forward = forward
    try:
        return run()
    finally:
        del unet.forward


def with_package(pipe, cache: DeepCacheConfig, run):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=cache.interval, cache_branch_id=cache.branch)
    helper.enable()
    try:
        return run()
    finally:
        helper.disable()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-shapes-xl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--branch", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def run():
        return sample(pipe, CAPTIONS, args.steps, args.guidance, size, args.seed)

    methods = {"full": run}
    for interval in args.intervals:
        cache = DeepCacheConfig(interval=interval, branch=args.branch)
        methods[f"ours i{interval}"] = lambda cache=cache: with_ours(pipe, cache, args.steps, run)
        methods[f"DeepCache i{interval}"] = lambda cache=cache: with_package(pipe, cache, run)
    seconds = {name: [] for name in methods}
    images = {}
    for _ in range(args.repeats):
        for name, method in methods.items():
            started = time.process_time()
            images[name] = method()
            seconds[name].append(time.process_time() - started)
    full = images["full"]
    rows = []
    for name in methods:
        best = min(seconds[name])
        package = name.replace("ours", "DeepCache")
        rows.append({
            "method": name, "cpu_seconds": round(best, 2), "all_seconds": [round(s, 2) for s in seconds[name]],
            "speed_up": round(min(seconds["full"]) / best, 3),
            "psnr_vs_full": round(float(np.mean([psnr(a, b) for a, b in zip(images[name], full)])), 2),
            "max_pixel_difference_vs_package": (int(np.abs(images[name].astype(int) - images[package]).max())
                                                if name.startswith("ours") else None),
        })
    print(f"{args.model}, {len(CAPTIONS)} captions, {args.steps} steps, guidance {args.guidance}, branch {args.branch}, "
          f"{torch.get_num_threads()} thread, best of {args.repeats}")
    for row in rows:
        print(json.dumps(row))
    if args.json:
        write_atomically(args.json, json.dumps(rows, indent=1).encode())


if __name__ == "__main__":
    main()
