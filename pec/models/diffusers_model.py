"""What the real diffusers models (`sd3`, `flux`) share: local-folder checks, the prompt-embedding
cache, the scheduler's sigma schedule, gradient checkpointing and micro-batched VAE decoding.

A model comes from a diffusers folder (`model_index.json`, `transformer/`, `vae/`, `text_encoder*/`,
`tokenizer*/`, `scheduler/`), as `save_pretrained` writes it and as the hub repositories of SD3.5 and
FLUX.1-dev ship it: a local folder, or a hub id resolved through huggingface_hub's cache (`pec.hub`:
offline with HF_HUB_OFFLINE, safetensors only, never remote code).

Text encoders are not submodules of the FlowModel: `FlowModel.to(device)` moves only the transformer
and the VAE. With `text_encoders="offload"` the encoders stay on the CPU and visit the GPU only to
encode prompts the cache has not seen; every prompt is encoded once (`PromptCache`).

Full fine-tuning on several processes loads no transformer whole: `load_pipeline(...,
empty_transformer=True)` builds the transformer(s) from their config.json with parameters on the meta
device (`empty_model`), and `pec.distributed.load_sharded_transformer` later reads each rank's rows of the
safetensors files (`component_weights`) into its FSDP2 shards.
"""
from __future__ import annotations

import abc
import copy
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pec.hub import load_options, resolve_model_path
from pec.models.base import FlowModel, PromptBatch, WeightFiles

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}
TEXT_ENCODER_PLACEMENTS = ("offload", "gpu")
# The pipeline components that are denoising transformers (Wan2.2 A14B has a second one, its low-noise expert).
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# The libraries a pipeline's components may come from (model_index.json): any other is code the folder ships.
COMPONENT_LIBRARIES = ("diffusers", "transformers")


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'bf16' / 'float16' / 'float32' (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"--model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_pipeline_folder(path: str | Path | None, *, model_name: str, pipeline_classes: Sequence[str],
                          transformer_class: str, required: Sequence[str], revision: str | None = None) -> Path:
    """Check that `path` (a local folder, or a hub id at `revision`: `pec.hub.resolve_model_path`) is a diffusers
    folder of the expected pipeline; return its local folder.

    Reads only JSON files, so a wrong folder fails in milliseconds, before any weights load. The error names
    `--model.path` and says what the folder must hold. Every component must come from diffusers or
    transformers: a folder that names another library would have diffusers import code it ships.
    """
    hint = (f"--model.path must be a diffusers folder of a {' / '.join(pipeline_classes)} (a local folder or a hub "
            f"id ORG/NAME, as `save_pretrained` writes it, with model_index.json, transformer/, vae/, ...) for "
            f"--model.name {model_name}")
    if not path:
        raise ValueError(f"{hint}; it is empty")
    folder = resolve_model_path(path, revision)
    if not folder.is_dir():
        raise ValueError(f"{hint}; {folder} is not a folder")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"{hint}; {folder} has no model_index.json")
    index = json.loads(index_file.read_text())
    found = index.get("_class_name")
    if found not in pipeline_classes:
        raise ValueError(f"{hint}; {folder} holds a {found} (model_index.json): choose the matching --model.name")
    foreign = {name: entry[0] for name, entry in index.items() if not name.startswith("_") and isinstance(entry, list)
               and entry[:1] != [None] and entry[0] not in COMPONENT_LIBRARIES}
    if foreign:
        raise ValueError(f"--model.path: {folder} has components of other libraries than diffusers and transformers "
                         f"({foreign}, model_index.json): pec never runs code a model folder ships")
    missing = [name for name in required if not (folder / name).is_dir() or index.get(name, [None])[0] is None]
    if missing:
        raise ValueError(f"{hint}; {folder} lacks the component folder(s) {missing}")
    config_file = folder / "transformer" / "config.json"
    found = json.loads(config_file.read_text()).get("_class_name") if config_file.is_file() else None
    if found != transformer_class:
        raise ValueError(f"{hint}; its transformer is a {found}, not a {transformer_class} "
                         f"({config_file}): a checkpoint of another architecture")
    return folder


def empty_model(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The diffusers model of `folder` (from its config.json) with every parameter on the meta device: no
    storage, no weights read. Built as `from_pretrained(folder, torch_dtype=dtype)` builds it before it reads
    the weights (accelerate's `init_empty_weights` under `dtype` as the default dtype), so buffers computed at
    construction (rotary tables) are real and the same; parameters get the dtypes from_pretrained gives them:
    `dtype`, float32 in the class's `_keep_in_fp32_modules` (Wan's norms and time embedder)."""
    import diffusers
    from accelerate import init_empty_weights

    config = json.loads((folder / "config.json").read_text())
    with init_empty_weights():
        model = build_in_dtype(getattr(diffusers, config["_class_name"]), config, dtype)
    return model.eval()


def build_in_dtype(cls: type, config: dict, dtype: torch.dtype) -> nn.Module:
    """`cls.from_config(config)` with the dtypes `cls.from_pretrained(..., torch_dtype=dtype)` gives: built
    under `dtype` as the default dtype (buffers computed at construction too, as from_pretrained builds it),
    then the checkpoint's floating tensors in float32 where a part of their name is one of the class's
    `_keep_in_fp32_modules`, else in `dtype` (diffusers' load_model_dict_into_meta). On whatever device the
    caller's context gives (the meta device: no storage)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = cls.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    keep = cls._keep_in_fp32_modules or ()
    for name, tensor in model.state_dict(keep_vars=True).items():
        wanted = torch.float32 if any(part in keep for part in name.split(".")) else dtype
        if not tensor.is_floating_point() or tensor.dtype == wanted:
            continue
        owner, _, attr = name.rpartition(".")
        holder = model.get_submodule(owner)
        if isinstance(tensor, nn.Parameter):
            holder._parameters[attr] = nn.Parameter(tensor.to(wanted), requires_grad=tensor.requires_grad)
        else:
            holder._buffers[attr] = tensor.to(wanted)
    return model


def component_weights(folder: Path) -> WeightFiles:
    """The safetensors files of a diffusers component folder (one file, or the shards its index names)."""
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return WeightFiles(tuple(folder / n for n in names))
    if (folder / WEIGHTS_NAME).is_file():
        return WeightFiles((folder / WEIGHTS_NAME,))
    raise ValueError(f"--model.path: {folder} has no {WEIGHTS_NAME} (or its .index.json): loading shard by shard "
                     f"(full fine-tuning on several processes) reads safetensors; save the model with "
                     f"save_pretrained(safe_serialization=True)")


def load_pipeline(pipeline_class: type, path: str | Path, dtype: str | torch.dtype, *, empty_transformer: bool = False,
                  **components: object):
    """`pipeline_class.from_pretrained(path)` from the local folder `path` (checked: `check_pipeline_folder`), in
    `dtype`, with `components` given instead of loaded; never remote code, and safetensors only for a folder
    of the hub cache (`pec.hub.load_options`). With `empty_transformer`, every transformer of the folder
    (`TRANSFORMER_COMPONENTS`) comes from `empty_model` instead: nothing of it is read;
    `pec.distributed.load_sharded_transformer` loads it later, shard by shard."""
    dtype = resolve_dtype(dtype)
    if empty_transformer:
        index = json.loads((Path(path) / "model_index.json").read_text())
        for name in TRANSFORMER_COMPONENTS:
            if index.get(name, [None])[0] is not None:
                components[name] = empty_model(Path(path) / name, dtype)
    return pipeline_class.from_pretrained(path, torch_dtype=dtype, **load_options(path), **components)


def model_kwargs(cfg: object) -> dict:
    """The options of a `ModelConfig` that `from_pretrained` of every diffusers model takes, as keyword arguments."""
    return {"dtype": cfg.dtype, "resolution": cfg.resolution, "max_sequence_length": cfg.max_sequence_length,
            "gradient_checkpointing": cfg.gradient_checkpointing, "vae_batch": cfg.vae_batch,
            "text_encoders": cfg.text_encoders, "prompt_cache": cfg.prompt_cache, "revision": cfg.revision}


class PromptCache:
    """Encodes each distinct prompt once and keeps its rows (on `storage`, the CPU by default).

    `encode(prompts) -> PromptBatch` runs only on prompts not yet cached. At most `max_size` prompts
    are kept (least recently used are dropped; 0 = no limit).
    """

    def __init__(self, encode: Callable[[list[str]], PromptBatch], max_size: int = 0,
                 storage: str | torch.device = "cpu") -> None:
        if max_size < 0:
            raise ValueError(f"--model.prompt_cache must be >= 0, got {max_size}")
        self.encode = encode
        self.max_size = max_size
        self.storage = torch.device(storage)
        self._rows: OrderedDict[str, PromptBatch] = OrderedDict()
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __call__(self, prompts: Sequence[str], device: str | torch.device) -> PromptBatch:
        """The encoded `prompts` (one row each, in order) on `device`."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of strings, got a single str")
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        if missing:
            self.misses += len(missing)
            batch = self.encode(missing).to(self.storage)  # one copy per tensor
            for i, prompt in enumerate(missing):
                self._rows[prompt] = batch.row(i)  # without its padding: prompts batch by their own length
        for prompt in prompts:
            self._rows.move_to_end(prompt)
        out = PromptBatch.cat([self._rows[p] for p in prompts]).to(device, non_blocking=True)
        while self.max_size and len(self._rows) > max(self.max_size, len(set(prompts))):
            self._rows.popitem(last=False)
        return out


class DiffusersFlowModel(FlowModel):
    """A diffusers text-to-image pipeline as a `FlowModel` (the shared part of `sd3` and `flux`).

    Subclasses set `sample_shape` and implement `_encode` (the pipeline's text encoders),
    `velocity` and `_to_vae_latents` (latents -> the VAE's unscaled latent images).

    Args:
        pipeline: the loaded diffusers pipeline (its transformer, VAE, text encoders and scheduler).
        resolution: image side in pixels.
        max_sequence_length: T5 tokens per prompt.
        gradient_checkpointing: recompute the transformer's blocks in the backward pass.
        vae_batch: images per VAE decode call (0 = all at once).
        text_encoders: 'offload' (on the CPU, on the GPU only to encode uncached prompts) or 'gpu'.
        prompt_cache: most prompts kept encoded (0 = no limit).
    """

    text_encoder_names: tuple[str, ...] = ()
    # Each network of `transformer` (its name there: "" is the transformer itself) -> its pipeline component.
    transformer_components: dict[str, str] = {"": "transformer"}

    def __init__(self, pipeline, *, resolution: int, max_sequence_length: int = 256,
                 gradient_checkpointing: bool = False, vae_batch: int = 8, text_encoders: str = "offload",
                 prompt_cache: int = 0) -> None:
        super().__init__()
        if text_encoders not in TEXT_ENCODER_PLACEMENTS:
            raise ValueError(f"--model.text_encoders must be one of {TEXT_ENCODER_PLACEMENTS}, got {text_encoders!r}")
        if vae_batch < 0:
            raise ValueError(f"--model.vae_batch must be >= 0, got {vae_batch}")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"--model.resolution must be a positive int, got {resolution!r}")
        self.pipeline = pipeline
        self.transformer = pipeline.transformer
        self.vae = pipeline.vae
        self.resolution = resolution
        self.max_sequence_length = max_sequence_length
        self.vae_batch = vae_batch
        self.offload_text_encoders = text_encoders == "offload"
        self.scheduler_config = dict(pipeline.scheduler.config)
        self.vae.requires_grad_(False)
        for encoder in self._text_encoders():
            encoder.requires_grad_(False).eval()
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.prompt_cache = PromptCache(self._encode_on_device, prompt_cache)

    # -------------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD3 and FLUX)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_seq_len(self) -> int:
        """Image tokens the transformer sees at this resolution (what FLUX's dynamic shift reads)."""
        return (self.resolution // (self.vae_scale_factor * self.transformer.config.patch_size)) ** 2

    def check_resolution(self, multiple: int) -> None:
        """ValueError unless the resolution is a positive multiple of `multiple`."""
        if self.resolution % multiple:
            raise ValueError(f"--model.resolution must be a multiple of {multiple} for this model "
                             f"(VAE factor x patch size), got {self.resolution}")

    def source_folder(self, purpose: str = "its transformer cannot load shard by shard") -> Path:
        """The local diffusers folder the pipeline was loaded from (a hub id's cache folder); ValueError,
        ending with `purpose` (what needs the folder), for a pipeline built in memory."""
        folder = self.pipeline.name_or_path
        if not folder or not Path(folder).is_dir():
            raise ValueError(f"this model's pipeline was built in memory, not loaded from a folder: {purpose}")
        return Path(folder)

    def transformer_weights(self) -> dict[str, WeightFiles]:
        """The safetensors files of each transformer component in the folder the pipeline was loaded from."""
        folder = self.source_folder()
        return {name: component_weights(folder / component)
                for name, component in self.transformer_components.items()}

    def _text_encoders(self) -> list[nn.Module]:
        return [m for m in (getattr(self.pipeline, n, None) for n in self.text_encoder_names) if m is not None]

    @property
    def device(self) -> torch.device:
        """The transformer's device (where prompts are encoded and latents live)."""
        return next(self.transformer.parameters()).device

    # -------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> PromptBatch:
        """Encoded prompts from the cache (each distinct prompt is encoded once); "" is the null prompt."""
        return self.prompt_cache(prompts, self.device)

    @torch.no_grad()
    def _encode_on_device(self, prompts: list[str]) -> PromptBatch:
        device = self.device
        encoders = self._text_encoders()
        for encoder in encoders:  # a no-op where they already are ('gpu' after the first call)
            encoder.to(device)
        try:
            batch = self._encode(prompts, device)
        finally:
            if self.offload_text_encoders:
                for encoder in encoders:
                    encoder.to("cpu")
        dtype = self.transformer.dtype
        return PromptBatch(batch.embeds.to(dtype), None if batch.pooled is None else batch.pooled.to(dtype),
                           batch.mask)

    @abc.abstractmethod
    def _encode(self, prompts: list[str], device: torch.device) -> PromptBatch:
        """Run the pipeline's text encoders on `prompts` (no cache)."""

    @abc.abstractmethod
    def _to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler latents (B, *sample_shape) -> the VAE's unscaled latent images (B, C, h, w)."""

    # -------------------------------------------------------------------------------------------
    def schedule(self, num_steps: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Sigmas of the pipeline's own scheduler config, set as the pipeline sets them (`_set_timesteps`)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        self._set_timesteps(scheduler, num_steps)
        return scheduler.sigmas.to(device=device, dtype=torch.float32)

    def _set_timesteps(self, scheduler, num_steps: int) -> None:
        """SD3's static shift, or FLUX.1's dynamic shift mu = calculate_shift(image_seq_len) on
        linspace(1, 1/N, N), as their pipelines call `scheduler.set_timesteps`."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        if scheduler.config.get("use_dynamic_shifting", False):
            c = scheduler.config
            mu = calculate_shift(self.image_seq_len, c.get("base_image_seq_len", 256),
                                 c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        else:
            scheduler.set_timesteps(num_steps, device="cpu")

    @property
    def decode_chunk(self) -> int | None:
        """`vae_batch` rows a VAE call (None: the whole batch, vae_batch 0)."""
        return self.vae_batch or None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode latents into images in [0, 1] (unclamped, differentiable), `vae_batch` at a time.

        With grad enabled each micro-batch is checkpointed, so a guided sampler backpropagating
        through the VAE holds one micro-batch's activations at a time.
        """
        step = self.vae_batch or latents.shape[0]
        chunks = []
        for start in range(0, latents.shape[0], step):
            piece = latents[start:start + step]
            if torch.is_grad_enabled() and piece.requires_grad:
                chunks.append(checkpoint(self._decode_chunk, piece, use_reentrant=False))
            else:
                chunks.append(self._decode_chunk(piece))
        return torch.cat(chunks)

    def _decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(self._vae_latents(latents), return_dict=False)[0]
        return (images.float() + 1) / 2

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler latents -> what `vae.decode` takes: unpacked, the VAE's scaling and shift factors undone
        (SD3, FLUX.1; FLUX.2's VAE has batch-norm statistics instead)."""
        config = self.vae.config
        return self._to_vae_latents(latents).to(self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)

    def __deepcopy__(self, memo: dict) -> DiffusersFlowModel:
        """A copy with its own transformer that shares the frozen VAE, text encoders and prompt cache
        (the full-fine-tuning KL reference needs only the transformer copied)."""
        clone = copy.copy(self)
        clone._modules = dict(self._modules)
        clone._parameters = dict(self._parameters)
        clone._buffers = dict(self._buffers)
        clone.transformer = copy.deepcopy(self.transformer, memo)
        return clone
