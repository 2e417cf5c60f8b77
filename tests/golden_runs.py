"""Golden runs: fixed-seed tiny training jobs, each in a fresh process, hashed tensor by tensor.

    python tests/golden_runs.py JOB[,JOB...] WORKDIR   # those jobs, one after the other in this process; prints
                                                      # {job: {tensor name: sha256}} of their final EMA weights
    python tests/golden_runs.py --record               # every job; rewrites tests/golden_hashes.json

A restructure of the code must reproduce every hash bit for bit; the stored hashes change only in a commit that
says why. The jobs run single-threaded on the CPU's baseline instruction set (PINNED_ENV), so that neither the
number of cores nor the vector units of the machine change a bit of the result, and they are recorded and checked
the same way: the single-process jobs together in one fresh process, the two-process job in a launch of its own.
The two-process job is also the DDP run that tests/distributed holds FSDP and DeepSpeed runs against.
"""

import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from helpers import free_port, write_captioned_dataset

ROOT = Path(__file__).resolve().parents[1]
HASHES = Path(__file__).with_name("golden_hashes.json")

# One thread (reductions keep their order), ATen's scalar kernels, MKL's and oneDNN's portable code paths.
PINNED_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "DNNL_MAX_CPU_ISA": "SSE41",
    "HF_HUB_OFFLINE": "1",
    "PYTHONHASHSEED": "0",
}

TINY = [
    "--max_train_samples",
    64,
    "--train_batch_size",
    8,
    "--max_train_steps",
    4,
    "--logging_steps",
    1,
    "--lr_warmup_steps",
    2,
    "--fid_num_samples",
    0,
    "--validation_steps",
    0,
    "--num_sample_images",
    0,
    "--checkpointing_steps",
    0,
]
SAMPLES = ["--num_inference_steps", 2]
TEXT_CAPTIONS = 24
SHARDED = (
    "--model dit_tiny --patch_size 4 --class_conditional --ot_coupling --max_train_steps 4 --checkpointing_steps 2 "
    "--max_train_samples 64 --train_batch_size 8 --lr_warmup_steps 2 --validation_samples 8 --num_sample_images 4 "
    "--num_inference_steps 2 --logging_steps 1 --fid_num_samples 0"
).split()

JOBS = {
    # Class-conditional flow UNet with OT coupling, and every source of training randomness; validation and grids
    # run between steps, so a duty that draws from the global RNG would change the weights.
    "flow_unet_ot": [
        "train_cfm.py",
        *TINY,
        *SAMPLES,
        "--base_channels",
        8,
        "--ot_coupling",
        "--dropout",
        0.1,
        "--random_flip",
        "--cond_drop_prob",
        0.3,
        "--validation_steps",
        2,
        "--validation_samples",
        8,
        "--sample_steps",
        2,
        "--num_sample_images",
        4,
    ],
    "ddpm_dit_v": [
        "train_ddpm.py",
        *TINY,
        *SAMPLES,
        "--model",
        "dit_tiny",
        "--patch_size",
        4,
        "--prediction_type",
        "v_prediction",
        "--snr_gamma",
        5,
    ],
    "vae": ["train_vae.py", *TINY, "--vae_base_channels", 8],
    "text_minilm_cross_attn": [
        "train_cfm.py",
        *TINY,
        "--dataset_name",
        "{captioned}",
        "--max_train_samples",
        TEXT_CAPTIONS,
        "--text_encoder",
        "minilm",
        "--text_conditioning",
        "cross_attn",
        "--class_conditional",
        "false",
        "--base_channels",
        8,
    ],
    "latent_dit": [
        "train_cfm.py",
        *TINY,
        "--latent_dataset",
        "{latents}",
        "--model",
        "dit_tiny",
        "--patch_size",
        2,
        "--max_train_samples",
        32,
    ],
    # A tiny DiT for 4 steps, checkpointed at step 2; tests/distributed runs it under FSDP2 and DeepSpeed too.
    "ddp_two_processes": ["train_cfm.py", *SHARDED],
}
SINGLE_PROCESS = [name for name in JOBS if name != "ddp_two_processes"]
TWO_PROCESSES = [
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
]


def captioned_dataset(root: Path) -> Path:
    """Fashion-MNIST test images with labels and templated captions, as a local parquet dataset."""
    folder = root / "captioned"
    folder.mkdir()
    return write_captioned_dataset(folder, TEXT_CAPTIONS)


def latent_dataset(root: Path) -> Path:
    """32 Fashion-MNIST images encoded by a KL-VAE initialised from seed 0 (8 and 16 channels, f2)."""
    import torch

    import encode_latents
    from modules.networks.vae import KLVAE

    torch.manual_seed(0)
    KLVAE(in_channels=1, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8).save_pretrained(
        root / "vae"
    )
    out = root / "latents"
    encode_latents.main(
        [
            "--vae",
            str(root / "vae"),
            "--output_dir",
            str(out),
            "--dataset_name",
            "fashion_mnist",
            "--max_train_samples",
            "32",
            "--resolution",
            "32",
            "--shard_size",
            "16",
        ]
    )
    return out


def tensor_hashes(path: Path) -> dict[str, str]:
    """{name: sha256 of dtype, shape and bytes} of every tensor in a safetensors file."""
    from safetensors.torch import load_file

    out = {}
    for name, tensor in sorted(load_file(str(path)).items()):
        digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
        out[name] = digest.hexdigest()[:16]
    return out


def run_job(name: str, workdir: Path) -> dict[str, str]:
    """Run job `name` in this process (its data made first) and return the hashes of its final EMA weights."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "run"
    argv = [str(a) for a in JOBS[name]]
    if "{captioned}" in argv:
        argv[argv.index("{captioned}")] = str(captioned_dataset(workdir))
    if "{latents}" in argv:
        argv[argv.index("{latents}")] = str(latent_dataset(workdir))
    script, args = argv[0], [*argv[1:], "--output_dir", str(out)]
    if name == "ddp_two_processes":
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        port = ["--main_process_port", str(free_port())]
        proc = subprocess.run(
            [sys.executable, *TWO_PROCESSES, *port, str(ROOT / script), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        log = proc.stdout + proc.stderr
        if proc.returncode or any(bad in log for bad in ("Traceback", "Aborted", "core dumped", "terminate called")):
            raise SystemExit(f"{name} failed or did not end cleanly (exit {proc.returncode}):\n{log[-6000:]}")
    else:
        import importlib

        importlib.import_module(Path(script).stem).main(args)
    return tensor_hashes(out / "diffusion_pytorch_model.safetensors")


def run_in_fresh_process(names, workdir: Path, timeout: float = 600) -> dict[str, dict[str, str]]:
    """`run_job` of each of `names`, one after the other in a new interpreter with PINNED_ENV, each in
    workdir/<name>; returns {name: hashes}."""
    env = {**os.environ, **PINNED_ENV}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), ",".join(names), str(workdir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode:
        raise RuntimeError(
            f"golden jobs {names} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:] == ["--record"]:
        with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(2) as pool:
            groups = [SINGLE_PROCESS, ["ddp_two_processes"]]
            hashes = {
                k: v
                for f in [pool.submit(run_in_fresh_process, g, Path(tmp)) for g in groups]
                for k, v in f.result().items()
            }
        HASHES.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
        print(f"wrote {HASHES}: {sum(map(len, hashes.values()))} tensors of {len(hashes)} runs")
    else:
        names, workdir = sys.argv[1].split(","), Path(sys.argv[2])
        print(json.dumps({name: run_job(name, workdir / name) for name in names}))
