"""Captions for images: a vision-language model (BLIP-2, PaliGemma 2, any image-text-to-text model) or a template.

    captioner = load_captioner("blip2")               # or "paligemma", a Hub id, a local directory
    captions = captioner(captioner.inputs(images))    # PIL images -> list of str, greedy by default

A model's captions are its decoded new tokens: the prompt it echoes is cut off, whitespace stripped. BLIP-2 takes
no prompt by default (plain captioning; a prompt is a prefix it continues); PaliGemma takes "caption en". Other
image-text-to-text models get `processor(images=..., text=prompt)`: chat models need the prompt written in their own
format, image token included.

A template caption is `template.format(label=class_phrase(class name))`, one of several templates chosen per image
from (seed, image index), so the choice does not depend on batches or processes.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modules.config import UserError
from modules.data.checks import open_image
from modules.data.images import FASHION_MNIST_CLASSES
from modules.data.sources import load_train_data

# --captioner name -> (default model id, the model_type its config must have)
NAMED_CAPTIONERS = {
    "blip2": ("Salesforce/blip2-opt-2.7b", "blip-2"),
    "paligemma": ("google/paligemma2-3b-pt-224", "paligemma"),
}
DEFAULT_PROMPTS = {"paligemma": "caption en"}  # by model_type; others caption without a prompt
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_dtype(device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _not_loadable(model_id: str, path: Path, error: Exception) -> UserError:
    """Why `model_id` has no transformers config, in the user's terms."""
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            class_name = json.loads(config_file.read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError):
            class_name = None
        if class_name:  # diffusers writes its class name there
            return UserError(
                f"--captioner '{model_id}' is a diffusers {class_name}, not an image-to-text model; give BLIP-2, "
                "PaliGemma or another image-text-to-text model (transformers)"
            )
    reason = (str(error).strip().splitlines() or [""])[0][:300]
    if "trust_remote_code" in reason:
        return UserError(
            f"--captioner '{model_id}' needs its own code to load; pass --trust_remote_code if you trust it"
        )
    if path.exists():
        return UserError(f"--captioner '{model_id}': not a transformers model directory ({reason})")
    return UserError(
        f"--captioner '{model_id}' is not a local directory, and the Hub could not give it ({type(error).__name__}: "
        f"{reason}); give blip2, paligemma, template, a Hub model id or a directory (offline: a cached model)"
    )


def _auto_model_class(config):
    """The transformers Auto class that loads `config` as an image-to-text model, or None if it is not one."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForVision2Seq" in auto_map and hasattr(transformers, "AutoModelForVision2Seq"):
        return transformers.AutoModelForVision2Seq
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or "AutoModelForImageTextToText" in auto_map:
        return transformers.AutoModelForImageTextToText
    return None


class CaptionInputs:
    """Collate PIL images into the model's inputs (picklable, so that DataLoader workers can run it)."""

    def __init__(self, processor, text: str | None):
        self.processor, self.text = processor, text

    def __call__(self, images):
        text = None if self.text is None else [self.text] * len(images)
        return self.processor(images=images, text=text, return_tensors="pt")


@dataclass
class ModelCaptioner:
    """A vision-language model and its processor; the weights load on first use, on `device`."""

    source: str  # what from_pretrained reads: the Hub id, or the directory's absolute path
    config: object  # its transformers config
    processor: object
    prompt: str | None
    dtype: str
    device: torch.device
    revision: str | None = None
    trust_remote_code: bool = False
    generate_kwargs: dict = field(default_factory=dict)
    _model: object = field(default=None, repr=False)

    @property
    def model(self):
        if self._model is None:
            auto = _auto_model_class(self.config)
            model = auto.from_pretrained(
                self.source, revision=self.revision, dtype=DTYPES[self.dtype], trust_remote_code=self.trust_remote_code
            )
            self._model = model.to(self.device).eval()
        return self._model

    @property
    def inputs(self) -> CaptionInputs:
        text = self.prompt
        if self.config.model_type == "paligemma":  # its image tokens first, then the prompt
            text = f"{self.processor.image_token}{self.prompt or ''}"
        return CaptionInputs(self.processor, text)

    def record(self) -> dict:
        """Everything the captions depend on."""
        return dict(
            kind="model",
            model=self.source,
            revision=self.revision,
            model_type=self.config.model_type,
            prompt=self.prompt,
            dtype=self.dtype,
            **self.generate_kwargs,
        )

    @torch.inference_mode()
    def __call__(self, inputs) -> list[str]:
        """Captions of one batch of `self.inputs(images)`."""
        inputs = dict(inputs.to(device=self.device, dtype=self.model.dtype))
        inputs.pop("labels", None)  # PaliGemma's processor adds training labels
        out = self.model.generate(**inputs, **self.generate_kwargs)
        prompt_ids = inputs.get("input_ids")
        n = 0 if prompt_ids is None else prompt_ids.shape[1]
        echoed = 0 < n <= out.shape[1] and torch.equal(out[:, :n], prompt_ids.to(out.device))
        texts = self.processor.batch_decode(out[:, n:] if echoed else out, skip_special_tokens=True)
        prompt = (self.prompt or "").strip()
        if not echoed and prompt:  # e.g. BLIP-2 given no input ids: its prompt comes back in the text
            texts = [t.strip()[len(prompt) :] if t.strip().startswith(prompt) else t for t in texts]
        return [t.strip() for t in texts]


def load_captioner(
    name: str,
    model_id: str | None = None,
    *,
    prompt: str | None = None,
    dtype: str | None = None,
    device=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_new_tokens: int = 30,
    num_beams: int = 1,
) -> ModelCaptioner:
    """Open `name` (blip2, paligemma, a Hub id or a directory; `model_id` overrides the default id of blip2 and
    paligemma): its config and processor now, the weights on first use. Raise `UserError` if it is not one."""
    from transformers import AutoConfig, AutoProcessor

    default_id, expected_type = NAMED_CAPTIONERS.get(name, (name, None))
    model_id = model_id or default_id
    path = Path(model_id).expanduser()
    source = str(path.resolve()) if path.is_dir() else model_id  # found again from any directory
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001 - no config, no model_type, unknown repo, offline: all the user's to fix
        raise _not_loadable(model_id, path, e) from None
    if expected_type and config.model_type != expected_type:
        raise UserError(
            f"--captioner {name}: '{model_id}' is a {config.model_type} model, not {expected_type}; pass "
            f"--captioner {model_id} to use it as it is"
        )
    if _auto_model_class(config) is None:
        raise UserError(
            f"--captioner '{model_id}' is not an image-to-text model (its config has model_type "
            f"'{config.model_type}'); give blip2, paligemma or another image-text-to-text model"
        )
    try:
        processor = AutoProcessor.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise _not_loadable(model_id, path, e) from None
    if not (hasattr(processor, "image_processor") and hasattr(processor, "batch_decode")):
        raise UserError(
            f"--captioner '{model_id}': its processor ({type(processor).__name__}) does not take images and text"
        )
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"  # generation continues every prompt from its end
    device = torch.device(device or "cpu")
    return ModelCaptioner(
        source=source,
        config=config,
        processor=processor,
        prompt=DEFAULT_PROMPTS.get(config.model_type) if prompt is None else prompt,
        dtype=dtype or default_dtype(device),
        device=device,
        revision=revision,
        trust_remote_code=trust_remote_code,
        generate_kwargs=dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False),
    )


def class_phrase(name: str) -> str:
    """A class name as it reads in a sentence: lower case, '/' as ' or ', '_' as a space.
    "T-shirt/top" -> "t-shirt or top", "ankle boot" -> "ankle boot"."""
    return " ".join(name.replace("/", " or ").replace("_", " ").lower().split())


def parse_templates(values: list[str]) -> list[str]:
    """Templates from --template values (each may hold several, separated by '|'); each placeholder must be
    {label}. Literal braces are written {{ and }}, as in str.format."""
    templates = [t.strip() for value in values for t in value.split("|") if t.strip()]
    if not templates:
        raise UserError("--captioner template needs --template, e.g. --template 'a photo of a {label}'")
    for template in templates:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as e:
            raise UserError(f"--template '{template}': {e} (write a literal brace as {{{{ or }}}})") from None
        unknown = [f for f in fields if f != "label"]
        if unknown:
            raise UserError(
                f"--template '{template}': unknown placeholder {{{unknown[0]}}}; the only one is {{label}}, the class "
                "name"
            )
    return templates


@dataclass
class TemplateCaptioner:
    """Captions from class labels: image i gets template number `choice(i)` with {label} its class phrase."""

    templates: list[str]
    class_names: tuple[str, ...] | None  # None: labels are written as numbers
    seed: int = 0

    def choice(self, index: int) -> int:
        if len(self.templates) == 1:
            return 0
        return int(np.random.default_rng([self.seed, index]).integers(len(self.templates)))

    def __call__(self, indices, labels) -> list[str]:
        names = self.class_names
        return [
            self.templates[self.choice(i)].format(label=class_phrase(names[y]) if names else str(y))
            for i, y in zip(indices, labels, strict=True)
        ]

    def record(self) -> dict:
        return dict(kind="template", templates=self.templates, seed=self.seed)


ORIGINAL_CAPTION = "original_caption"  # a source column named "caption" is kept under this name


class ImageRows(torch.utils.data.Dataset):
    """Item i: source image i as a PIL RGB image. `table(rows)`: the columns kept from those rows (`features`)."""

    def __init__(self, data, features):
        self.data, self.features = data, features  # data: modules.data.TrainData

    def __len__(self):
        return len(self.data.dataset)

    def __getitem__(self, i):

        return open_image(self.data.dataset.images[i], self.data.dataset.names(i), "RGB")

    @property
    def labels(self):
        return self.data.dataset.labels

    @property
    def output_features(self):
        """The output's columns: the kept ones, a "caption" among them renamed, then the new "caption"."""
        import datasets

        kept = {ORIGINAL_CAPTION if k == "caption" else k: v for k, v in self.features.items()}
        return datasets.Features({**kept, "caption": datasets.Value("string")})

    def columns(self, rows: range) -> dict[str, list]:
        """The kept columns of `rows`, as python values for `features`."""
        raise NotImplementedError

    def table(self, rows: range):
        import datasets

        return datasets.Dataset.from_dict(self.columns(rows), features=self.features).data.table


class _FashionMNISTRows(ImageRows):
    """The 28x28 grayscale originals, stored as PNG, and their class labels."""

    def __getitem__(self, i):
        from PIL import Image

        return Image.fromarray(self.data.dataset.images[i, 0].numpy()).convert("RGB")

    def columns(self, rows: range) -> dict:
        out = {"image": [self.data.dataset.images[i, 0].numpy() for i in rows]}
        if self.labels is not None:
            out["label"] = [int(self.labels[i]) for i in rows]
        return out


class _FolderRows(ImageRows):
    """An image folder: the image files as they are, their paths, labels from subfolders, metadata.jsonl's columns."""

    def __init__(self, data, root: Path):
        import datasets

        self.root, files = root, data.dataset.images
        self.metadata = _folder_metadata(root, files)
        try:
            inferred = datasets.Dataset.from_dict(self.metadata).features if self.metadata else {}
        except Exception as e:  # noqa: BLE001 - pyarrow's words for a column of mixed types
            raise UserError(f"{root / 'metadata.jsonl'}: a column holds values of different types ({e})") from None
        features = {"image": datasets.Image(), "file_name": datasets.Value("string")}
        if data.class_names:  # labels from subfolders; labels from metadata.jsonl are among its columns
            features["label"] = datasets.ClassLabel(names=list(data.class_names))
        super().__init__(data, datasets.Features({**features, **inferred}))

    def columns(self, rows: range) -> dict:
        files = self.data.dataset.images
        out = {
            "image": [files[i] for i in rows],
            "file_name": [Path(files[i]).relative_to(self.root).as_posix() for i in rows],
        }
        if "label" in self.features and "label" not in self.metadata:
            out["label"] = [int(self.labels[i]) for i in rows]
        return {**out, **{k: values[rows.start : rows.stop] for k, values in self.metadata.items()}}


def _folder_metadata(root: Path, files) -> dict[str, list]:
    """metadata.jsonl's columns but file_name (and image, label: ours), one value per file (None where absent).
    modules.data has checked the file already."""
    path, by_file = root / "metadata.jsonl", {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        if line.strip():
            row = json.loads(line)
            by_file[str((root / row.pop("file_name")).resolve())] = row
    keys = list(dict.fromkeys(k for row in by_file.values() for k in row if k not in ("image", "file_name")))
    rows = [by_file.get(str(Path(f).resolve()), {}) for f in files]
    return {k: [row.get(k) for row in rows] for k in keys}


class _DatasetRows(ImageRows):
    """A `datasets` dataset: every column kept as it is."""

    def __init__(self, data):
        self.ds = data.dataset.images.ds  # its image column was checked by modules.data
        super().__init__(data, self.ds.features)

    def table(self, rows: range):
        return self.ds.with_format("arrow")[rows.start : rows.stop]


def open_image_rows(data_args) -> ImageRows:
    """The images named by `data_args` (a modules.config.DataArguments), at their own size, with their columns."""
    import dataclasses

    import datasets

    if data_args.train_data_dir is None and data_args.dataset_name == "fashion_mnist":
        data = load_train_data(dataclasses.replace(data_args, resolution=28, num_channels=1))  # the originals
        features = {"image": datasets.Image()}
        if data.dataset.labels is not None:
            features["label"] = datasets.ClassLabel(names=list(FASHION_MNIST_CLASSES))
        return _FashionMNISTRows(data, datasets.Features(features))
    # Neither size nor channels apply (images are kept as they are); fixed, they open no image and key the data alike.
    data = load_train_data(dataclasses.replace(data_args, resolution=28, num_channels=3))
    if data_args.train_data_dir is not None:
        return _FolderRows(data, Path(data_args.train_data_dir))  # as given: the files' paths start with it
    return _DatasetRows(data)


def caption_rows(captioner, rows: ImageRows, indices: range, batch_size: int, num_workers: int = 0, progress=None):
    """Captions of images `indices` of `rows`, in order, by a ModelCaptioner or a TemplateCaptioner."""
    if isinstance(captioner, TemplateCaptioner):
        captions = captioner(indices, [int(rows.labels[i]) for i in indices])
        if progress is not None:
            progress.update(len(captions))
        return captions
    indices = list(indices)
    loader = torch.utils.data.DataLoader(
        rows,
        batch_sampler=[indices[i : i + batch_size] for i in range(0, len(indices), batch_size)],
        collate_fn=captioner.inputs,  # decoding and preprocessing in the workers
        num_workers=num_workers,
    )
    captions = []
    try:
        for inputs in loader:
            batch = captioner(inputs)
            captions += batch
            if progress is not None:
                progress.update(len(batch))
    except UserError as e:  # from a DataLoader worker it arrives wrapped in the worker's traceback
        raise UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None
    return captions


def caption_table(rows: ImageRows, indices: range, captions: list[str]):
    """One output shard as a pyarrow table: the kept columns of those rows, images embedded as bytes, and captions."""
    import pyarrow as pa
    from datasets.table import embed_table_storage

    table = rows.table(indices)
    table = table.rename_columns([ORIGINAL_CAPTION if n == "caption" else n for n in table.column_names])
    table = table.append_column("caption", pa.array(captions, pa.string()))
    return embed_table_storage(table.cast(rows.output_features.arrow_schema))
