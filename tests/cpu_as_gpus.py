"""Launch a training script under Accelerate's FSDP or DeepSpeed on CPU processes (gloo), as the tests do:

    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 --mixed_precision no \\
        tests/cpu_as_gpus.py train_cfm.py ...

Accelerate enables FSDP and DeepSpeed only on accelerators (MULTI_GPU and kin), while FSDP2 and DeepSpeed's ZeRO
(with its CPU accelerator) shard, gather and checkpoint CPU tensors over gloo as well. So this reports the CPU
processes to Accelerate as GPU ones with the gloo backend, keeps them on the CPU device, then runs the script
unchanged. DeepSpeed's shared-memory collective is left out: building it takes half a minute and gloo does the same.
"""

import os
import runpy
import sys

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_partial_init, _state_init = PartialState.__init__, AcceleratorState.__init__


def _partial_as_gpus(self, cpu=False, **kwargs):
    _partial_init(self, False, **kwargs)


def _state_as_gpus(self, mixed_precision=None, cpu=False, *args, **kwargs):
    _state_init(self, mixed_precision, False, *args, **kwargs)


def _gloo(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


if __name__ == "__main__":
    if torch.cuda.is_available():
        raise SystemExit("tests/cpu_as_gpus.py is for machines without GPUs; launch the script itself")
    PartialState.__init__, PartialState._prepare_backend = _partial_as_gpus, _gloo
    AcceleratorState.__init__ = _state_as_gpus
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
