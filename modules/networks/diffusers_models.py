"""Denoisers of the diffusers ecosystem behind our `(x, t, cond)` interface: a `UNet2DModel` (DDPMPipeline's, e.g.
google/ddpm-cifar10-32) or a `DiTTransformer2DModel` (DiTPipeline's, e.g. facebook/DiT-XL-2-256), so that our
samplers, evaluation and training loop use them as they are, and fine-tuning trains the diffusers network itself.

What the wrapper translates, and why:
    t in [0, 1] -> round(t * num_train_timesteps): diffusers networks were trained on the integer DDPM steps, and our
                   DDPM objective passes step / T (samplers.py, ddpm.py), so the network sees exactly its steps.
    cond         -> a DiT's class labels; None is the null class, id num_classes (1000 for ImageNet), which is both
                   DiTPipeline's unconditional id and our convention (samplers.guided_model). A UNet2DModel here is
                   unconditional.
    output       -> the prediction: a DiT that learns sigma outputs 2C channels, and only the first C are the
                   prediction (as DiTPipeline splits them); the variance half is left unused.

The diffusers DiT also drops labels itself while training (10%, from the global RNG, in each block); that is
switched off: classifier-free-guidance dropout is ours (--cond_drop_prob), drawn from the step's generator.
`save_pretrained` writes the network alone, in diffusers' own format, so a fine-tuned model is again a diffusers
checkpoint; artifacts/model_folder.py records next to it what wraps it again.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import LabelEmbedding
from diffusers.models.modeling_utils import ModelMixin

from modules.config import UserError

# The diffusers classes wrapped, and the kind a saved model records.
NETWORK_CLASSES = {"UNet2DModel": UNet2DModel, "DiTTransformer2DModel": DiTTransformer2DModel}
NETWORK_KINDS = {"UNet2DModel": "diffusers_unet2d", "DiTTransformer2DModel": "diffusers_dit"}


def network_class_name(config: dict) -> str | None:
    """The wrapped class a diffusers config.json describes, or None. Pipelines saved before diffusers 0.28 name a
    DiT `Transformer2DModel` with norm_type ada_norm_zero (diffusers itself maps it to DiTTransformer2DModel)."""
    name = config.get("_class_name")
    if name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_zero":
        return "DiTTransformer2DModel"
    return name if name in NETWORK_CLASSES else None


def check_network_config(name: str, config: dict, where: str):
    """Refuse, naming the key, a configuration of a wrapped class that the wrapper does not translate."""
    if name == "UNet2DModel":
        for key in ("class_embed_type", "num_class_embeds"):
            if config.get(key) is not None:
                raise UserError(
                    f"{where}: {key} {config[key]!r}: class-conditional UNet2DModels are not supported (they have no "
                    "null class for guidance); unconditional ones are"
                )
        if config.get("time_embedding_type", "positional") != "positional":
            raise UserError(
                f"{where}: time_embedding_type {config['time_embedding_type']!r} is not supported (a DDPM UNet2DModel "
                "embeds integer timesteps: 'positional')"
            )
    else:
        channels, out = config.get("in_channels", 4), config.get("out_channels")
        if out not in (None, channels, 2 * channels):
            raise UserError(
                f"{where}: out_channels {out} is neither in_channels ({channels}) nor twice it (learned sigma)"
            )
        if not config.get("num_embeds_ada_norm"):
            raise UserError(
                f"{where}: num_embeds_ada_norm is {config.get('num_embeds_ada_norm')!r}; a DiT has classes"
            )
    size = config.get("sample_size")
    if size is None:
        raise UserError(f"{where}: sample_size is not set, so the size of the samples is unknown")
    if isinstance(size, list | tuple) and len(set(size)) != 1:
        raise UserError(f"{where}: sample_size {list(size)}: only square samples are supported")


def _square(size) -> int:
    return int(size[0]) if isinstance(size, list | tuple) else int(size)


class DiffusersDenoiser(ModelMixin, ConfigMixin):
    """A diffusers `UNet2DModel` or `DiTTransformer2DModel` (`self.net`) as `forward(x, t, cond)`, t in [0, 1].

    `network_config` is the network's own config; in_channels, sample_size and num_classes are derived from it (what
    the samplers and sample.py read from `model.config`), and any values given for them are replaced. `network`: an
    already loaded network to wrap instead of building one from the config (not part of the config)."""

    _supports_gradient_checkpointing = True
    ignore_for_config = ["network"]

    @register_to_config
    def __init__(
        self,
        network_class: str = "UNet2DModel",
        network_config: dict | None = None,
        num_train_timesteps: int = 1000,
        in_channels: int | None = None,
        sample_size: int | None = None,
        num_classes: int | None = None,
        network: torch.nn.Module | None = None,
    ):
        super().__init__()
        if network_class not in NETWORK_CLASSES:
            raise ValueError(f"network_class must be one of {', '.join(NETWORK_CLASSES)}, got {network_class!r}")
        config = dict(network_config or {})
        self.net = network if network is not None else NETWORK_CLASSES[network_class].from_config(config)
        net = self.net.config
        is_dit = network_class == "DiTTransformer2DModel"
        self.register_to_config(
            in_channels=net.in_channels,
            sample_size=_square(net.sample_size),
            num_classes=(net.num_embeds_ada_norm or 0) if is_dit else 0,
        )
        for module in self.net.modules():
            if isinstance(module, LabelEmbedding):  # CFG dropout is ours (see the module docstring)
                module.dropout_prob = 0.0

    @classmethod
    def wrap(cls, network: torch.nn.Module, num_train_timesteps: int) -> DiffusersDenoiser:
        """A loaded diffusers network, wrapped as it is (same weights, device and dtype)."""
        name = network_class_name({**dict(network.config), "_class_name": type(network).__name__})
        config = {k: v for k, v in dict(network.config).items() if not k.startswith("_")}
        # Keywords, not positions: diffusers marks positional arguments as defaults, which from_config drops.
        return cls(network_class=name, network_config=config, num_train_timesteps=num_train_timesteps, network=network)

    @property
    def kind(self) -> str:
        return NETWORK_KINDS[self.config.network_class]

    @property
    def downsample_factor(self) -> int:
        """Input height and width must be multiples of this."""
        if self.config.network_class == "DiTTransformer2DModel":
            return self.net.config.patch_size
        return 2 ** (len(self.net.config.block_out_channels) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond=None) -> torch.Tensor:
        """x: (B, C, H, W); t: scalar or (B,) in [0, 1]; cond: (B,) class labels of a DiT, or None (its null class)."""
        if isinstance(cond, dict):
            raise ValueError(f"a diffusers {self.config.network_class} here takes no text condition")
        steps = torch.as_tensor(t, device=x.device).float() * self.config.num_train_timesteps
        steps = steps.round().expand(x.shape[0])  # (B,) the integer steps the network was trained on
        if self.config.network_class == "UNet2DModel":
            return self.net(x, steps).sample
        if cond is None:
            cond = torch.full((x.shape[0],), self.config.num_classes, dtype=torch.long, device=x.device)
        out = self.net(x, timestep=steps, class_labels=cond).sample  # (B, C or 2C, H, W)
        return out[:, : self.config.in_channels]  # learned sigma: the prediction is the first half

    def save_pretrained(self, save_directory, **kwargs):
        """The network alone, in diffusers' format (config.json names its class), so diffusers loads it as is."""
        self.net.save_pretrained(save_directory, **kwargs)
