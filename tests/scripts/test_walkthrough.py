"""docs/own_images.md, "Train on your own images", command by command, on a folder of 12 PNGs in two class folders
with tiny models: template captions, latents of a local VAE with the captions' CLIP embeddings, a text-conditional DiT,
samples from a prompt, and the push to a Hub repo (the local stand-in of tests/hub_server.py).

WALKTHROUGH holds the commands as docs/own_images.md shows them, with $PLACEHOLDERS: README_VALUES fill them for that
page, and the test fills them with its folders and tiny settings and runs them. `python X.py` and the one-process
`accelerate launch X.py` run X's main(argv) in this process; the push runs in a subprocess, which alone sees the Hub.
"""

import json
import shlex
import string
import sys

import numpy as np
from helpers import ROOT, hub_env, in_process, run
from hub_server import FakeHub
from PIL import Image

from bench.encode_latents import tiny_vae as save_tiny_vae

WALKTHROUGH = [
    "# captions from the class folders (my_images/cat/*.png -> 'a photo of a cat'), or --captioner blip2",
    'python caption.py --captioner template --template "a photo of a {label}" --train_data_dir $IMAGES \\\n'
    "    --output_dir $CAPTIONS",
    "# latents of the images and CLIP embeddings of the captions, computed once",
    "python encode_latents.py --vae $VAE --dataset_name $CAPTIONS --resolution $RESOLUTION \\\n"
    "    --text_encoder $TEXT_ENCODER --output_dir $LATENTS",
    "# a DiT conditioned on the captions; grids of 16 samples, FID at the end",
    "accelerate launch train_cfm.py --latent_dataset $LATENTS --text_encoder $TEXT_ENCODER \\\n"
    "    --class_conditional false --model $MODEL --patch_size 2 --train_batch_size $BATCH"
    " --max_train_steps $STEPS \\\n"
    "    --num_sample_images 16 --num_inference_steps $SAMPLING_STEPS --fid_num_samples $FID_SAMPLES"
    " --output_dir $RUN",
    'python sample.py --model $RUN --prompt "a photo of a dog" --num_images 8 --output $GRID',
    "python -m modules.artifacts.hub $RUN --hub_model_id $HUB_MODEL_ID   # token: $$HF_TOKEN or `hf auth login`",
]

README_VALUES = dict(
    IMAGES="my_images/",
    CAPTIONS="data/my_captions",
    VAE="stabilityai/sd-vae-ft-ema",
    RESOLUTION="256",
    TEXT_ENCODER="openai/clip-vit-large-patch14",
    LATENTS="data/my_latents",
    MODEL="dit_s",
    BATCH="64",
    STEPS="20000",
    SAMPLING_STEPS="20",
    FID_SAMPLES="500",
    RUN="runs/mine",
    GRID="grid.png",
    HUB_MODEL_ID="me/mine",
)

TOKEN = "hf_WalkthroughToken0123456789"


def render(values: dict) -> list[str]:
    """The walk-through's lines with the placeholders filled (values are quoted for the shell where needed)."""
    quoted = {k: shlex.quote(str(v)) for k, v in values.items()}
    return [string.Template(line).substitute(quoted) for line in WALKTHROUGH]


def readme_block() -> str:
    return "\n".join(render(README_VALUES))


def image_folder(root):
    """12 PNGs of 32x32 in root/cat and root/dog: reddish cats and bluish dogs, each a little different."""
    rng = np.random.default_rng(0)
    for label, channel in (("cat", 0), ("dog", 2)):
        (root / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
            pixels[..., channel] = 150 + 15 * i
            Image.fromarray(pixels).save(root / label / f"{label}_{i}.png")


def test_train_on_your_own_images_walkthrough(tmp_path, clip_text_folder, capsys):
    vae = tmp_path / "tiny_vae"
    save_tiny_vae(vae)
    image_folder(tmp_path / "my_images")
    values = dict(
        IMAGES=tmp_path / "my_images",
        CAPTIONS=tmp_path / "captions",
        VAE=vae,
        RESOLUTION=32,
        TEXT_ENCODER=clip_text_folder,
        LATENTS=tmp_path / "latents",
        MODEL="dit_tiny",
        BATCH=4,
        STEPS=2,
        SAMPLING_STEPS=2,
        FID_SAMPLES=0,
        RUN=tmp_path / "run",
        GRID=tmp_path / "grid.png",
        HUB_MODEL_ID="someone/mine",
    )
    assert values.keys() == README_VALUES.keys()
    commands = [line for line in render(values) if not line.startswith("#")]
    with FakeHub() as hub:
        for command in commands:
            argv = shlex.split(command.replace("\\\n", " "), comments=True)
            if argv[:3] == ["python", "-m", "modules.artifacts.hub"]:
                env = {**hub_env(hub.url, tmp_path / "home"), "HF_TOKEN": TOKEN}
                pushed = run([sys.executable, *argv[1:]], env=env)
            else:
                script = argv[2] if argv[:2] == ["accelerate", "launch"] else argv[1]
                in_process(script, *argv[argv.index(script) + 1 :])

    captions = json.loads((tmp_path / "captions" / "captions.json").read_text())
    assert captions["num_images"] == 12 and captions["class_names"] == ["cat", "dog"]
    latents = json.loads((tmp_path / "latents" / "latents.json").read_text())
    assert latents["latent_shape"] == [4, 16, 16] and latents["text_encoder"]["source"] == str(clip_text_folder)
    assert "the text encoder is not loaded" in capsys.readouterr().out  # training read the stored embeddings
    record = json.loads((tmp_path / "run" / "objective.json").read_text())
    assert record["steps"] == 2 and sorted(set(record["sample_prompts"])) == ["a photo of a cat", "a photo of a dog"]
    assert Image.open(tmp_path / "grid.png").size[0] > 32
    # The repo holds the model with its local VAE and CLIP text encoder, so that it samples anywhere.
    files = hub.repos["someone/mine"]
    for name in (
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "objective.json",
        "README.md",
        "vae/config.json",
        "text_encoder/config.json",
    ):
        assert name in files, sorted(files)
    weights = "diffusion_pytorch_model.safetensors"
    assert files[weights] == (tmp_path / "run" / weights).read_bytes()
    components = json.loads(files["objective.json"])
    assert (components["latent"]["vae"]["source"], components["text_encoder"]["source"]) == ("vae", "text_encoder")
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    assert "pushed" in pushed.stdout


def test_readme_shows_the_walkthrough_as_tested():
    block = readme_block()
    assert "$" not in block.replace("$HF_TOKEN", "")  # every placeholder has its README value
    page = (ROOT / "docs" / "own_images.md").read_text()
    assert block in page, f"docs/own_images.md's walk-through differs from the tested one:\n{block}"
