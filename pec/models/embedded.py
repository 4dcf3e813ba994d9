"""The embedded default model: a tiny SD3 transformer over 8x8 digits, in pixel space.

A real diffusers `SD3Transformer2DModel` (the SD3.5 backbone) with a small config, conditioned by the
learned `PromptEncoder`. The latent space is pixel space in [-1, 1]; `decode` is the identity up to the
affine map to [0, 1]. The pretrained weights ship in pec/assets/embedded/ (see `pec.pretrain`).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors import safe_open
from safetensors.torch import save_file

from pec.data.digits import IMAGE_SHAPE, to_unit
from pec.hub import resolve_model_path
from pec.models.base import FlowModel, PromptBatch, WeightFiles, to_device
from pec.models.prompt_encoder import PromptEncoder

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_DIR = ASSETS / "embedded"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"
# SD3 feeds the transformer timesteps in [0, 1000] (FlowMatchEulerDiscreteScheduler: t = 1000 * sigma).
NUM_TRAIN_TIMESTEPS = 1000


@dataclass
class EmbeddedConfig:
    """Architecture of the embedded model (stored as config.json next to the weights)."""

    patch_size: int = 2
    num_layers: int = 3
    attention_head_dim: int = 32
    num_attention_heads: int = 2
    text_dim: int = 64
    max_tokens: int = 4

    @property
    def width(self) -> int:
        return self.attention_head_dim * self.num_attention_heads


class EmbeddedFlowModel(FlowModel):
    """Tiny SD3 text-to-image flow model for 8x8 digits (see the module docstring).

    `empty_transformer`: build the transformer's parameters on the meta device (see `from_pretrained`).
    """

    def __init__(self, config: EmbeddedConfig | None = None, empty_transformer: bool = False) -> None:
        super().__init__()
        self.weights_dir: Path | None = None  # set by from_pretrained
        self.config = config or EmbeddedConfig()
        c = self.config
        channels, size, _ = IMAGE_SHAPE
        if size % c.patch_size:
            raise ValueError(f"patch_size must divide the image size {size}, got {c.patch_size}")
        self.sample_shape = IMAGE_SHAPE
        self.prompt_encoder = PromptEncoder(c.text_dim, c.max_tokens)
        empty = contextlib.nullcontext()
        if empty_transformer:
            from accelerate import init_empty_weights

            empty = init_empty_weights()  # parameters on the meta device; buffers real
        with empty:
            self.transformer = SD3Transformer2DModel(
                sample_size=size, patch_size=c.patch_size, in_channels=channels, out_channels=channels,
                num_layers=c.num_layers, attention_head_dim=c.attention_head_dim,
                num_attention_heads=c.num_attention_heads, joint_attention_dim=c.text_dim,
                caption_projection_dim=c.width, pooled_projection_dim=c.text_dim,
                pos_embed_max_size=size // c.patch_size)

    def encode_prompts(self, prompts: Sequence[str]) -> PromptBatch:
        """Encode prompts with the learned prompt encoder ("" is the null prompt)."""
        return self.prompt_encoder(prompts)

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, prompts: PromptBatch) -> torch.Tensor:
        """Predicted velocity (B, 1, 8, 8) at flow times `sigma` (B,) in [0, 1]."""
        if latents.shape[1:] != self.sample_shape:
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, self.sample_shape))}), "
                             f"got {tuple(latents.shape)}")
        if sigma.shape != latents.shape[:1]:
            raise ValueError(f"sigma must have shape ({latents.shape[0]},), got {tuple(sigma.shape)}")
        if len(prompts) != latents.shape[0]:
            raise ValueError(f"prompts must have {latents.shape[0]} rows, got {len(prompts)}")
        return self.transformer(hidden_states=latents, encoder_hidden_states=prompts.embeds,
                                pooled_projections=prompts.pooled, timestep=sigma * NUM_TRAIN_TIMESTEPS,
                                return_dict=False)[0]

    decode_chunk = 1  # an elementwise map: each row decodes alone

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (not clamped): pixel space, so just the affine map from [-1, 1]."""
        return to_unit(latents)

    def save(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors to `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_FILE))

    def transformer_weights(self) -> dict[str, WeightFiles]:
        """The transformer's tensors in the model's one safetensors file (names prefixed "transformer.")."""
        if self.weights_dir is None:
            return super().transformer_weights()
        return {"": WeightFiles((self.weights_dir / WEIGHTS_FILE,), "transformer.")}

    @staticmethod
    def check_path(directory: str | Path, revision: str | None = None) -> Path:
        """The local folder of a model folder (config.json + model.safetensors): `directory` itself, or a hub
        id at `revision` resolved through huggingface_hub's cache (`pec.hub`); FileNotFoundError without its
        weights file, ValueError (naming --model.path) for an id that does not resolve."""
        directory = resolve_model_path(directory, revision, layout="model")
        if not (directory / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}; run `python -m pec.pretrain`")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path = EMBEDDED_DIR, device: str | torch.device = "cpu",
                        empty_transformer: bool = False, revision: str | None = None) -> EmbeddedFlowModel:
        """Load the shipped (or a `pec.pretrain --out` produced) model, from a folder or a hub id at `revision`
        (`check_path`); eval mode, on `device`. With `empty_transformer` the transformer is built on the meta
        device and none of its tensors is read (full fine-tuning on several processes:
        `pec.distributed.load_sharded_transformer` loads its shards)."""
        directory = cls.check_path(directory, revision)
        weights = directory / WEIGHTS_FILE
        config = EmbeddedConfig(**json.loads((directory / CONFIG_FILE).read_text()))
        model = cls(config, empty_transformer=empty_transformer)
        model.weights_dir = directory
        with safe_open(str(weights), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if not (empty_transformer and k.startswith("transformer."))}
        result = model.load_state_dict(state, strict=not empty_transformer)
        missing = [k for k in result.missing_keys if not k.startswith("transformer.")]  # all but the transformer's
        if missing or result.unexpected_keys:
            raise ValueError(f"{weights} does not match its config.json's model: missing {missing[:3]}, unexpected "
                             f"{result.unexpected_keys[:3]}")
        return to_device(model, device).eval()
