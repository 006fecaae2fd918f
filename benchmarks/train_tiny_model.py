"""Train the shipped ``tiny-shapes`` model from scratch on the synthetic shapes data set.

Three stages, seeded and single-threaded so that a rerun on the same machine gives the same weights:

1. VAE: a 3-level ``AutoencoderKL`` (64 x 64 px -> 4 x 16 x 16 latent, factor 4) on
   reconstruction (L1 + MSE) with a tiny KL term; its latent scale is set to 1 / std of the
   data's latents, as SD does.
2. Text encoders + U-Net, jointly, on the frozen VAE's latents: epsilon prediction under the
   pipeline's own noise schedule, Min-SNR-5 weighting, captions dropped 10% of the time (to the
   zero embeddings the SD-XL pipeline uses for an empty negative prompt, so CFG works), EMA weights.
3. Decoder: the VAE decoder alone, on the frozen encoder's latents, from the saved model; stage 1
   left edges soft (square corners round off), and the latent space the U-Net learned stays put.

Weights are saved (fp16, atomically) every ``--save-every`` steps and at the end into
``atedm_compile/weights/tiny-shapes``; ``config.json`` records the settings, steps and losses.
At the end it writes ``docs/samples.png`` and prints the detector's accuracy on held-out captions,
rendered and generated (``--evaluate-only`` does just that for a saved model).

    nice -n 19 python benchmarks/train_tiny_model.py

Run with ``nice``: it takes about 45 minutes of one core.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from atedm_compile.files import write_atomically
from atedm_compile.shapes import synthetic
from atedm_compile.shapes.measures import to_pixels
from atedm_compile.models import SDXL_BASE_UNET, TINY_VAE, tiny_tokenizer
from atedm_compile.models import TINY_SHAPES, TINY_SHAPES_XL, build_pipeline
from atedm_compile.shapes.trained import save_model, state_dict

IMAGE_SIZE = 64
TEXT_HIDDEN = 48
TIME_EMBED = 8

# tiny-shapes: 2 transformer layers in every attention block, 64 px (latent 16 x 16).
UNET = {
    **SDXL_BASE_UNET,
    "attention_head_dim": [2, 2, 4],
    "block_out_channels": [24, 48, 96],
    "cross_attention_dim": 2 * TEXT_HIDDEN,
    "norm_num_groups": 8,
    "addition_time_embed_dim": TIME_EMBED,
    "projection_class_embeddings_input_dim": 6 * TIME_EMBED + TEXT_HIDDEN,
    "sample_size": IMAGE_SIZE // 4,
    "transformer_layers_per_block": [1, 2, 2],
}

# The tiny random pipeline's VAE (models.TINY_VAE), one level fewer: factor 4, 64 px.
VAE = {
    **TINY_VAE,
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "sample_size": IMAGE_SIZE,
    "force_upcast": False,
}


# tiny-shapes-xl: SD-XL's depth pattern. No attention at level 1, 2-layer blocks at level 2
# (16 x 16 = 256 tokens), 10-layer blocks at level 3 and in the mid block (8 x 8 = 64 tokens),
# 128 px images through the tiny-shapes VAE (factor 4, latent 32 x 32). Level 3 is 80 wide (not
# 96) so that the fp16 weights stay under 25 MB.
UNET_XL = {
    **UNET,
    "block_out_channels": [24, 48, 80],
    "sample_size": 128 // 4,
    "transformer_layers_per_block": [1, 2, 10],
}

# name -> (image size, U-Net config, default output folder)
PRESETS = {
    "tiny-shapes": (IMAGE_SIZE, UNET, TINY_SHAPES),
    "tiny-shapes-xl": (128, UNET_XL, TINY_SHAPES_XL),
}


def text_encoder_config(vocab_size: int, projection: bool) -> dict:
    config = dict(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_attention_heads=2,
        num_hidden_layers=3, max_position_embeddings=77,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    if projection:
        config["projection_dim"] = TEXT_HIDDEN
    return config


# The scheduler of models.tiny_sdxl_pipeline: SD's scaled-linear betas; training uses the same.
SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
}


def optimise(loss, optimizer, schedule, running, progress, clip=None):
    """One optimiser step (gradients clipped to norm 1 over ``clip`` when given); returns the
    smoothed loss, which the progress bar shows."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    schedule.step()
    running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
    progress.set_postfix(loss=f"{running:.4f}")
    return running


def warmup_cosine(optimizer, steps: int, warmup: int = 100):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def train_vae(vae, images: np.ndarray, steps: int, batch: int, rng: np.random.Generator) -> float:
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    progress = tqdm(range(steps), desc="vae", mininterval=5)
    running = None
    for _ in progress:
        x = to_pixels(images[rng.integers(len(images), size=batch)])
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        running = optimise(loss, optimizer, schedule, running, progress)
    vae.eval().requires_grad_(False)
    return running


def finetune_decoder(directory: Path, images: np.ndarray, steps: int, batch: int, seed: int) -> float:
    """Stage 3: sharpen the decoder on the frozen encoder's latents (the U-Net's latent space does
    not move), starting from the model saved in ``directory``, and save it back."""
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    pipe = build_pipeline(config, load_file(directory / "model.safetensors"))
    vae = pipe.vae
    decoder = torch.nn.ModuleList([vae.post_quant_conv, vae.decoder]).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=5e-4, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps, warmup=20)
    rng = np.random.default_rng(seed)
    progress = tqdm(range(steps), desc="decoder", mininterval=5)
    running = None
    for _ in progress:
        x = to_pixels(images[rng.integers(len(images), size=batch)])
        with torch.no_grad():
            latent = vae.encode(x).latent_dist.mode()
        reconstruction = vae.decode(latent).sample
        loss = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x)
        running = optimise(loss, optimizer, schedule, running, progress)
    config["training"].update(decoder_steps=steps, decoder_loss=round(running, 5))
    save_model(directory, config, state_dict(pipe))
    return running


def reuse_vae(pipe, config: dict, directory: Path) -> float:
    """Load the VAE of the model saved in ``directory`` into ``pipe`` (stages 1 and 3 done
    there); returns that model's VAE loss."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    saved = json.loads((directory / "config.json").read_text())
    prefix = "vae."
    weights = {k[len(prefix):]: v.float() for k, v in load_file(directory / "model.safetensors").items()
               if k.startswith(prefix)}
    pipe.vae = AutoencoderKL.from_config(saved["vae"])
    pipe.vae.load_state_dict(weights, strict=True)
    pipe.vae.eval().requires_grad_(False)
    config["vae"] = saved["vae"]
    config["training"] = {key: saved["training"][key] for key in ("vae_steps", "vae_loss", "decoder_steps",
                                                                 "decoder_loss") if key in saved["training"]}
    return saved["training"]["vae_loss"]


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(to_pixels(images[i:i + batch])).latent_dist.mode()
                      for i in range(0, len(images), batch)])


def encode_text(pipe, ids: torch.Tensor, keep: torch.Tensor):
    """SD-XL's conditioning: penultimate hidden states of both encoders, concatenated, and encoder
    2's projected pooled output; rows where ``keep`` is False get zeros (the empty prompt)."""
    first = pipe.text_encoder(ids, output_hidden_states=True)
    second = pipe.text_encoder_2(ids, output_hidden_states=True)
    hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    pooled = second.text_embeds
    mask = keep.float()
    return hidden * mask[:, None, None], pooled * mask[:, None]


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


SAMPLE_CAPTIONS = (
    "a large red square in the center on a plain white background",
    "a small red triangle at the top left on a striped blue background",
    "a large blue circle at the bottom right on a checkered yellow background",
    "a large green triangle on the left on a plain gray background",
    "a small yellow square at the top on a striped green background",
    "a large yellow circle at the bottom on a plain blue background",
    "a small blue square on the right on a checkered white background",
    "a large green circle at the top right on a striped red background",
)


def image_size(pipe) -> int:
    """The pixel size a trained pipeline samples at: its U-Net's latent size times the VAE factor."""
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def sample(pipe, captions, seeds, steps: int, guidance: float) -> list:
    """One image per (caption, seed), sampled with the pipeline's own loop."""
    size = image_size(pipe)
    return [pipe(list(captions), height=size, width=size, num_inference_steps=steps,
                 guidance_scale=guidance, generator=[torch.Generator().manual_seed(seed) for _ in captions]).images
            for seed in seeds]


def write_sample_grid(pipe, path: Path, steps: int, guidance: float, seeds=(0, 1, 2, 3), zoom: int = 2) -> None:
    """A PNG grid: one row per caption of ``SAMPLE_CAPTIONS``, the training data's rendering of
    it first, then one sample per seed."""
    from PIL import Image, ImageDraw

    samples = sample(pipe, SAMPLE_CAPTIONS, seeds, steps, guidance)
    size = image_size(pipe)
    zoom = max(1, zoom * IMAGE_SIZE // size)
    tile, label = size * zoom, 14
    grid = Image.new("RGB", (tile * (1 + len(seeds)), (tile + label) * len(SAMPLE_CAPTIONS)), "white")
    draw = ImageDraw.Draw(grid)
    for row, caption in enumerate(SAMPLE_CAPTIONS):
        top = row * (tile + label)
        draw.text((2, top + 1), caption, fill="black")
        real, _ = synthetic.render(synthetic.parse_caption(caption), size)
        tiles = [Image.fromarray(real)] + [samples[column][row] for column in range(len(seeds))]
        for column, image in enumerate(tiles):
            grid.paste(image.resize((tile, tile), Image.Resampling.NEAREST), (column * tile, top + label))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def detector_accuracy(pipe, count: int, steps: int, guidance: float, seed: int = 1234, batch: int = 16) -> dict:
    """Share of images whose largest object the detector reads as the caption says, for ``count``
    held-out captions: on the rendered data, on its VAE round trip (the ceiling for samples) and on
    the pipeline's samples of the same captions."""
    images, _, captions, _ = synthetic.make_dataset(count, seed=seed, size=image_size(pipe))
    generated = []
    for start in range(0, count, batch):
        generated += sample(pipe, captions[start:start + batch], [seed + start], steps, guidance)[0]
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(to_pixels(images)).latent_dist.mode()).sample
    reconstructed = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    result = {}
    for name, pictures in (("rendered", images), ("vae-reconstructed", reconstructed), ("generated", generated)):
        scores = [synthetic.score(picture, caption) for picture, caption in zip(pictures, captions)]
        result[name] = {key: sum(s[key] for s in scores) / count for key in ("colour", "shape", "position")}
        result[name]["all"] = sum(all(s.values()) for s in scores) / count
    return result


def evaluate(directory: Path, grid: Path, steps: int, guidance: float, count: int) -> None:
    from atedm_compile.models import load_trained_pipeline

    pipe = load_trained_pipeline(directory)
    write_sample_grid(pipe, grid, steps, guidance)
    print(f"wrote {grid}")
    for name, accuracy in detector_accuracy(pipe, count, steps, guidance).items():
        print(name, {k: round(v, 3) for k, v in accuracy.items()})


def init_text_encoders(pipe, directory: Path) -> None:
    """Start both text encoders from those of the model saved in ``directory`` (same configs)."""
    from safetensors.torch import load_file

    weights = load_file(directory / "model.safetensors")
    for name in ("text_encoder", "text_encoder_2"):
        prefix = name + "."
        getattr(pipe, name).load_state_dict(
            {k[len(prefix):]: v.float() for k, v in weights.items() if k.startswith(prefix)}, strict=True)


class Checkpoint:
    """Resumable training state in one folder: ``state.safetensors`` (model, EMA and optimiser
    tensors, torch's RNG) and ``state.json`` (step, running loss, the data RNG, the settings it
    was started with), each written atomically. No pickle: a resume reads tensors and JSON only."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.resumed: list[dict] = []  # each resume: the step it resumed at and the --steps it ran to

    def exists(self) -> bool:
        return (self.directory / "state.json").is_file()

    def save(self, step, running, settings, trained, ema, optimizer, schedule, rng) -> None:
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().contiguous() for k, v in trained.state_dict().items()}
        tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()})
        optim = optimizer.state_dict()
        for index, state in optim["state"].items():
            for key, value in state.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).contiguous()
        tensors["torch_rng"] = torch.get_rng_state()
        record = {"step": step, "running": running, "settings": settings, "rng": rng.bit_generator.state,
                  "resumed": self.resumed,
                  "schedule": schedule.state_dict()["last_epoch"], "param_groups": optim["param_groups"]}
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(self.directory / "state.safetensors", lambda tmp: save_file(tensors, tmp))
        text = json.dumps(record, default=str)
        write_atomically(self.directory / "state.json", text.encode())

    def load(self, settings, trained, ema, optimizer, schedule, rng):
        """Restore everything ``save`` wrote; returns (step, running loss). Refuses a checkpoint
        started with other settings."""
        from safetensors.torch import load_file

        record = json.loads((self.directory / "state.json").read_text())
        # The step count may change on resume (the cosine decay is then over the new total);
        # anything else would train another model.
        changed = sorted(k for k in set(settings) | set(record["settings"])
                         if k != "steps" and settings.get(k) != record["settings"].get(k))
        if changed:
            raise SystemExit(f"checkpoint {self.directory} was started with other settings ({', '.join(changed)}); "
                             f"use the same ones, or another --checkpoint")
        tensors = load_file(self.directory / "state.safetensors")
        trained.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}, strict=True)
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
        for _ in range(record["schedule"] - schedule.state_dict()["last_epoch"]):
            schedule.step()
        torch.set_rng_state(tensors["torch_rng"])
        rng.bit_generator.state = record["rng"]
        if record["step"] >= settings["steps"]:
            raise SystemExit(f"checkpoint {self.directory} is at step {record['step']}, not before --steps "
                             f"{settings['steps']}")
        self.resumed = [*record.get("resumed", []), {"at_step": record["step"], "steps": settings["steps"]}]
        return record["step"], record["running"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny-shapes",
                        help="which shipped model's architecture and image size to train (default: %(default)s)")
    parser.add_argument("--out", help="output model folder (default: the shipped model's folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-size", type=int, default=16000)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--decoder-steps", type=int, default=600)
    parser.add_argument("--decoder-only", action="store_true",
                        help="run stage 3 alone, on the model saved in --out")
    parser.add_argument("--reuse-vae", metavar="DIR",
                        help="take the VAE (config, latent scale and weights, decoder stage included) from the "
                             "model saved in DIR and train only the text encoders and the U-Net")
    parser.add_argument("--init-text-from", metavar="DIR",
                        help="start both text encoders from the model saved in DIR (same text configs)")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="keep a resumable training state here (every --save-every steps) and resume from it "
                             "when present (default: ~/.cache/atedm-compile/train/MODEL)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evaluate-only", action="store_true",
                        help="skip training: sample grid and detector accuracy of the model in --out")
    parser.add_argument("--grid", help="sample grid PNG (default: docs/samples.png, docs/samples-xl.png for the xl model)")
    parser.add_argument("--sample-steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--eval-count", type=int, default=64)
    args = parser.parse_args()

    size, unet_config, default_out = PRESETS[args.model]
    args.out = Path(args.out or default_out)
    docs = Path(__file__).parents[1] / "docs"
    grid = Path(args.grid or docs / ("samples.png" if args.model == "tiny-shapes" else f"samples-{args.model[12:]}.png"))
    checkpoint = Checkpoint(Path(args.checkpoint or Path.home() / ".cache" / "atedm-compile" / "train" / args.model))
    torch.set_num_threads(args.threads)
    if args.evaluate_only:
        evaluate(args.out, grid, args.sample_steps, args.guidance, args.eval_count)
        return
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    started = time.time()

    images, _, captions, _ = synthetic.make_dataset(args.data_size, seed=args.seed, size=size)
    if args.decoder_only:
        loss = finetune_decoder(args.out, images, args.decoder_steps, args.vae_batch, args.seed + 1)
        print(f"decoder: loss {loss:.4f}, {time.time() - started:.0f} s")
        return
    tokenizer = tiny_tokenizer(synthetic.VOCABULARY)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    config = {
        "unet": unet_config, "vae": VAE, "scheduler": SCHEDULER,
        "text_encoder": text_encoder_config(len(tokenizer), projection=False),
        "text_encoder_2": text_encoder_config(len(tokenizer), projection=True),
        "image_size": size,
        "tokenizer_words": list(synthetic.VOCABULARY),
    }
    pipe = build_pipeline(config)
    if args.init_text_from:
        init_text_encoders(pipe, Path(args.init_text_from))

    vae_record = {}
    if args.reuse_vae:
        vae_loss = reuse_vae(pipe, config, Path(args.reuse_vae))
        vae_record = {**config.pop("training"), "vae_from": "an earlier run (--reuse-vae)"}
        if args.init_text_from:
            vae_record["text_encoders_from"] = "an earlier run (--init-text-from)"
    else:
        vae_loss = train_vae(pipe.vae, images, args.vae_steps, args.vae_batch, rng)
    latents = encode_all(pipe.vae, images)
    if args.reuse_vae:
        scale = pipe.vae.config.scaling_factor
    else:
        scale = 1 / latents.std().item()
        pipe.vae.register_to_config(scaling_factor=scale)
        config["vae"] = {**VAE, "scaling_factor": scale}
    latents = latents * scale
    print(f"vae: loss {vae_loss:.4f}, latent scale {scale:.4f}, {time.time() - started:.0f} s")

    trained = torch.nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder,
                                   "text_encoder_2": pipe.text_encoder_2})
    trained.train().requires_grad_(True)
    ema = copy.deepcopy(trained).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr, weight_decay=1e-2)
    schedule = warmup_cosine(optimizer, args.steps)
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = torch.clamp(snr, max=5.0) / snr  # Min-SNR-gamma (gamma 5) for epsilon prediction
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    settings = {"model": args.model, "seed": args.seed, "data_size": args.data_size, "steps": args.steps,
                "batch": args.batch, "lr": args.lr, "reuse_vae": bool(args.reuse_vae),
                "init_text_from": bool(args.init_text_from)}
    first, running = 1, None
    if checkpoint.exists():
        done, running = checkpoint.load(settings, trained, ema, optimizer, schedule, rng)
        first = done + 1
        print(f"resumed from {checkpoint.directory} at step {done}")

    def save(step: int, loss: float) -> None:
        live = {name: getattr(pipe, name) for name in trained}
        for name in trained:
            setattr(pipe, name, ema[name])
        config["training"] = {
            "seed": args.seed, "data_size": args.data_size, "vae_steps": args.vae_steps, "vae_loss": round(vae_loss, 5),
            "steps": step, "of_steps": args.steps, "batch": args.batch, "lr": args.lr, "loss": round(loss, 5),
            "seconds": round(time.time() - started), "threads": args.threads,
            **vae_record,
        }
        if checkpoint.resumed:
            config["training"]["resumed"] = checkpoint.resumed
        save_model(args.out, config, state_dict(pipe))
        for name, module in live.items():
            setattr(pipe, name, module)
        checkpoint.save(step, loss, settings, trained, ema, optimizer, schedule, rng)

    progress = tqdm(range(first, args.steps + 1), desc="unet", mininterval=5, initial=first - 1, total=args.steps)
    for step in progress:
        index = torch.from_numpy(rng.integers(len(images), size=args.batch))
        x0 = latents[index]
        noise = torch.randn_like(x0)
        t = torch.randint(0, len(alphas_cumprod), (args.batch,))
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        keep = torch.rand(args.batch) >= 0.1
        hidden, pooled = encode_text(pipe, ids[index], keep)
        prediction = pipe.unet(noisy, t, encoder_hidden_states=hidden,
                               added_cond_kwargs={"text_embeds": pooled,
                                                  "time_ids": time_ids.expand(args.batch, -1)}).sample
        loss = ((prediction - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (loss * loss_weight[t]).mean()
        running = optimise(loss, optimizer, schedule, running, progress, clip=trained.parameters())
        ema_update(ema, trained, min(0.999, (1 + step) / (10 + step)))
        if step % args.save_every == 0 or step == args.steps:
            save(step, running)
    print(f"unet: {args.steps} steps, loss {running:.4f}, {time.time() - started:.0f} s")
    if args.reuse_vae:
        evaluate(args.out, grid, args.sample_steps, args.guidance, args.eval_count)
        return
    loss = finetune_decoder(args.out, images, args.decoder_steps, args.vae_batch, args.seed + 1)
    print(f"decoder: loss {loss:.4f}, {time.time() - started:.0f} s; wrote {args.out}")
    evaluate(args.out, grid, args.sample_steps, args.guidance, args.eval_count)


if __name__ == "__main__":
    main()
