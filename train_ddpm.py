"""Train a DDPM (epsilon / x0 / v prediction on diffusers' noise schedules) with Accelerate.

    accelerate launch train_ddpm.py                                  # Fashion-MNIST, class-conditional UNet
    accelerate launch train_ddpm.py --prediction_type v_prediction --beta_schedule cosine --snr_gamma 5
    accelerate launch --multi_gpu train_ddpm.py --config configs/cifar10_unet_ddpm.yaml

Every flag: python train_ddpm.py --help.
"""

from modules.config import (
    SCRIPT_DEFAULTS,
    DataArguments,
    DDPMArguments,
    ModelArguments,
    TrainingArguments,
    cli_entry,
    parse_args,
)
from modules.objectives.ddpm import DDPMObjective
from modules.training.loop import train

DEFAULTS = dict(
    SCRIPT_DEFAULTS,
    output_dir="runs/fashion_mnist_unet_ddpm",
    learning_rate=1e-3,
    sampler="ddim",
    num_inference_steps=50,
)


@cli_entry
def main(argv=None):
    data_args, model_args, train_args, ddpm_args = parse_args(
        (DataArguments, ModelArguments, TrainingArguments, DDPMArguments), argv, DEFAULTS, description=__doc__
    )
    return train(__file__, data_args, model_args, train_args, DDPMObjective(ddpm_args), argv)


if __name__ == "__main__":
    main()
