"""Train our own KL-VAE (modules/networks/vae.py) with Accelerate, for latent diffusion on data no pretrained VAE fits.

    accelerate launch train_vae.py                                   # Fashion-MNIST 32x32, 4x downsampling
    accelerate launch train_vae.py --vae_model vae_f8 --train_data_dir my_images/ --resolution 256
    python encode_latents.py --vae runs/fashion_mnist_vae --output_dir data/fashion_mnist_latents

The same training loop as the diffusion scripts (EMA, checkpoints, resume, trackers); the grid shows originals
over their reconstructions, the validation reports loss and PSNR on held-out images, and the FID is a
reconstruction FID. Every flag: python train_vae.py --help.
"""

from modules.config import (
    SCRIPT_DEFAULTS,
    DataArguments,
    ModelArguments,
    TrainingArguments,
    VAEArguments,
    cli_entry,
    parse_args,
)
from modules.objectives.autoencoder import VAEObjective
from modules.training.loop import train

# The diffusion scripts' defaults, less what an autoencoder has no use for (guidance).
DEFAULTS = dict(
    {k: v for k, v in SCRIPT_DEFAULTS.items() if k != "guidance_scale"},
    output_dir="runs/fashion_mnist_vae",
    learning_rate=1e-3,
    max_train_steps=1000,
    num_sample_images=32,
    sample_steps=500,
    checkpointing_steps=500,
    validation_steps=250,
    eval_metrics="fid",
)


@cli_entry
def main(argv=None):
    data_args, train_args, vae_args = parse_args(
        (DataArguments, TrainingArguments, VAEArguments), argv, DEFAULTS, description=__doc__
    )
    model_args = ModelArguments(model=vae_args.vae_model, class_conditional=False)  # an autoencoder has no labels
    return train(__file__, data_args, model_args, train_args, VAEObjective(vae_args), argv)


if __name__ == "__main__":
    main()
