"""Train a DDPM (epsilon / x0 / v prediction on diffusers' noise schedules) with Accelerate.

    accelerate launch train_ddpm.py                                  # Fashion-MNIST, class-conditional UNet
    accelerate launch train_ddpm.py --prediction_type v_prediction --beta_schedule cosine --snr_gamma 5
    accelerate launch --multi_gpu train_ddpm.py --config configs/cifar10_unet_ddpm.yaml

Every flag: python train_ddpm.py --help.
"""

from modules.config import DataArguments, DDPMArguments, ModelArguments, TrainingArguments, cli_entry, parse_args
from modules.ddpm import DDPMObjective
from modules.training import train

DEFAULTS = dict(
    dataset_name="fashion_mnist",
    resolution=32,
    model="unet_s",
    class_conditional=True,
    output_dir="runs/fashion_mnist_unet_ddpm",
    train_batch_size=64,
    max_train_steps=500,
    learning_rate=1e-3,
    lr_scheduler="constant_with_warmup",
    lr_warmup_steps=100,
    ema_max_decay=0.999,
    ema_power=0.75,
    sample_steps=250,
    checkpointing_steps=250,
    checkpoints_total_limit=2,
    sampler="ddim",
    num_inference_steps=50,
    guidance_scale=1.5,
    num_sample_images=100,
)


@cli_entry
def main(argv=None):
    data, model, training, ddpm = parse_args(
        (DataArguments, ModelArguments, TrainingArguments, DDPMArguments), argv, DEFAULTS, description=__doc__
    )
    return train(__file__, data, model, training, DDPMObjective(ddpm), argv)


if __name__ == "__main__":
    main()
