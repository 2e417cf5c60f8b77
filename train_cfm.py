"""Train a flow-matching model (CFM / rectified flow, optional OT coupling) with Accelerate.

    accelerate launch train_cfm.py                                   # Fashion-MNIST, class-conditional UNet
    accelerate launch train_cfm.py --config configs/fashion_mnist_unet_cfm.yaml --output_dir runs/fm
    accelerate launch train_cfm.py --model dit_s --patch_size 4 --train_data_dir my_images/ --resolution 64
    accelerate launch train_cfm.py --objective meanflow --sampler meanflow --num_inference_steps 1   # one step

Every flag: python train_cfm.py --help.
Convention (modules/objectives/flow.py): x_t = (1 - t) x0 + t noise, v = noise - x0; MeanFlow's average velocity:
modules/objectives/meanflow.py.
"""

from modules.config import (
    SCRIPT_DEFAULTS,
    DataArguments,
    FlowArguments,
    ModelArguments,
    TrainingArguments,
    cli_entry,
    parse_args,
)
from modules.objectives.flow import FlowObjective
from modules.objectives.meanflow import MeanFlowObjective
from modules.training.loop import train

# The main job: Fashion-MNIST at 32x32, measured in configs/fashion_mnist_unet_cfm.yaml.
DEFAULTS = dict(
    SCRIPT_DEFAULTS,
    output_dir="runs/fashion_mnist_unet_cfm",
    learning_rate=2e-3,
    time_sampling="logit_normal",
    sampler="heun",
    num_inference_steps=20,
    fid_num_samples=200,
    fid_reference_samples=200,
)


@cli_entry
def main(argv=None):
    data_args, model_args, train_args, flow_args = parse_args(
        (DataArguments, ModelArguments, TrainingArguments, FlowArguments), argv, DEFAULTS, description=__doc__
    )
    objective = MeanFlowObjective if flow_args.objective == "meanflow" else FlowObjective
    return train(__file__, data_args, model_args, train_args, objective(flow_args), argv)


if __name__ == "__main__":
    main()
