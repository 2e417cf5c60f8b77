"""caption.py and encode_latents.py on two processes write what one process writes."""

import json

from helpers import (
    CAPTION_FASHION,
    LATENT_FASHION,
    accelerate_launch,
    assert_same_rows,
    fashion_images,
    in_process,
    own_captions,
    rows,
    table,
)


def test_blip2_prompt_is_cut_and_two_processes_write_the_same(tiny_blip2, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    argv = ["--captioner", tiny_blip2, "--prompt", "a photo of", *CAPTION_FASHION]
    in_process("caption.py", *argv, "--output_dir", one)
    images, _ = fashion_images(16)
    assert table(one)["caption"] == own_captions(tiny_blip2, images, text="a photo of")
    accelerate_launch("caption.py", *argv, "--output_dir", two)
    assert table(two) == table(one)
    a, b = (json.loads((d / "captions.json").read_text()) for d in (one, two))
    assert {k: v for k, v in a.items() if k != "command"} == {k: v for k, v in b.items() if k != "command"}


def test_two_processes_write_the_same_dataset(encoded, tiny_vae, tmp_path):
    out = tmp_path / "two"
    accelerate_launch("encode_latents.py", "--vae", tiny_vae, "--output_dir", out, *LATENT_FASHION)
    assert_same_rows(rows(out), rows(encoded))
    one, two = (json.loads((d / "latents.json").read_text()) for d in (encoded, out))
    assert {k: v for k, v in one.items() if k != "command"} == {k: v for k, v in two.items() if k != "command"}
