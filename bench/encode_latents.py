"""Encoding throughput: encode_latents.py's pipeline against a plain loop, in the same run on the same VAE.

    python bench/encode_latents.py                              # 512 Fashion-MNIST images, 32 px, tiny random VAE
    python bench/encode_latents.py --vae stabilityai/sd-vae-ft-ema --num_images 2048 --device cuda --dtype fp16

(a) plain: per batch, each image goes through PIL (resize to --resolution), then stack, then `VAE.encode` in fp32.
(b) pipeline: `load_train_data` then `modules.latents.encode_shard` (batches gathered in one index op for in-memory
    Fashion-MNIST, DataLoader workers for images decoded on access, channels_last on CUDA, --dtype): what
    encode_latents.py runs per shard.
Each is run --repeats times, interleaved; the best time of each gives img/s, and the ratio is pipeline / plain.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.config import DataArguments, help_field, parse_args
from modules.data.images import load_fashion_mnist
from modules.data.latents import encode_shard
from modules.data.sources import load_train_data
from modules.networks.vae import load_vae
from modules.pixels import to_model_range


@dataclass
class BenchArguments:
    vae: str | None = help_field("VAE (Hub id or directory). Default: a tiny random AutoencoderKL.", default=None)
    num_images: int = help_field("Fashion-MNIST training images to encode.", default=512)
    resolution: int = help_field("Image size.", default=32)
    batch_size: int = help_field("Images per VAE forward pass.", default=64)
    num_workers: int = help_field("DataLoader workers of the pipeline (used for images decoded on access).", default=2)
    device: str = help_field("cpu or cuda.", default="cuda" if torch.cuda.is_available() else "cpu")
    dtype: str = help_field("Pipeline precision: fp32, fp16 or bf16 (the plain loop is fp32).", default="fp32")
    repeats: int = help_field("Timed runs of each way.", default=3)


def tiny_vae(directory: Path) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).save_pretrained(directory)
    return str(directory)


def plain(vae, args: BenchArguments) -> int:
    images, _ = load_fashion_mnist("train")
    for start in range(0, args.num_images, args.batch_size):
        batch = []
        for array in images[start : min(start + args.batch_size, args.num_images)].numpy():
            image = Image.fromarray(array).resize((args.resolution, args.resolution), Image.BILINEAR)
            batch.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())[None])  # (1, H, W)
        vae.encode(to_model_range(torch.stack(batch)).to(vae.device))
    return args.num_images


def pipeline(vae, args: BenchArguments) -> int:
    data = load_train_data(DataArguments(max_train_samples=args.num_images, resolution=args.resolution))
    shard = encode_shard(vae, data.dataset, range(len(data.dataset)), args.batch_size, args.num_workers)
    return len(shard["mean"])


def timed(fn, vae, args) -> float:
    if vae.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    n = fn(vae, args)
    if vae.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main(argv=None):
    (args,) = parse_args((BenchArguments,), argv, description=__doc__)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    with tempfile.TemporaryDirectory() as tmp:
        source = args.vae or tiny_vae(Path(tmp) / "vae")
        vae_fp32 = load_vae(source, args.device)
        vae = vae_fp32 if args.dtype == "fp32" else load_vae(source, args.device, dtypes[args.dtype])
        plain(vae_fp32, args), pipeline(vae, args)  # warm-up: kernels, file cache, worker start-up code paths
        rates = {"plain": [], "pipeline": []}
        for _ in range(args.repeats):
            rates["plain"].append(timed(plain, vae_fp32, args))
            rates["pipeline"].append(timed(pipeline, vae, args))
    best = {k: max(v) for k, v in rates.items()}
    print(
        f"{args.num_images} images at {args.resolution} px, VAE {args.vae or 'tiny random AutoencoderKL'}, "
        f"{args.device}, batch {args.batch_size}, {args.repeats} repeats (best)"
    )
    print(f"{'plain loop (PIL per image, fp32)':40s} {best['plain']:9.1f} img/s")
    print(f"{f'pipeline (encode_shard, {args.dtype})':40s} {best['pipeline']:9.1f} img/s")
    print(f"ratio pipeline / plain: {best['pipeline'] / best['plain']:.2f}")
    return best


if __name__ == "__main__":
    main()
