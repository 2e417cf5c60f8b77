"""Launch a training script under Accelerate's FSDP on CPU processes (gloo), as tests do:

    accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 2 --mixed_precision no \\
        tests/cpu_fsdp.py train_cfm.py ...

Accelerate enables FSDP only on accelerators (MULTI_GPU and kin); FSDP2 itself shards, gathers and checkpoints on
CPU tensors over gloo. So this reports the CPU processes to Accelerate as GPU ones, on the CPU device, over a gloo
process group it starts itself, then runs the script unchanged.
"""

import os
import runpy
import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_prepare_backend = PartialState._prepare_backend


def _as_gpus(self, cpu=False, sagemaker_dp=False, backend=None):
    backend, distributed_type = _prepare_backend(self, cpu, sagemaker_dp, backend)
    return backend, DistributedType.MULTI_GPU if distributed_type == DistributedType.MULTI_CPU else distributed_type


if __name__ == "__main__":
    if torch.cuda.is_available():
        raise SystemExit("tests/cpu_fsdp.py is for machines without GPUs; launch the script itself")
    PartialState._prepare_backend = _as_gpus
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    torch.distributed.init_process_group("gloo")
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
