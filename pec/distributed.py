"""Everything about processes and ranks (DESIGN.md §8), so the Trainer reads the same with one process or many.

`python -m pec.train` runs in one process; `torchrun --nproc_per_node N -m pec.train ...` runs the same
trainer in N (and across nodes through torchrun's rendezvous flags). One process is exactly the
single-device run: every helper here is then the identity.

- Process group: NCCL on GPUs, gloo on CPU, created from torchrun's environment (RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR/PORT) with a timeout (`--dist.timeout`): a rank that dies or hangs makes
  the others fail with an error within it (gloo notices a dead peer's closed socket at once).
- Placement of a step's global batch (G prompt groups x K samples, global sample index g*K + j):
  `contiguous`: rank r holds whole groups (G/W each): advantages need every reward (B floats), but
  features never travel: the kNN entropy is local. `spread`: rank r holds samples j in
  [r*K/W, (r+1)*K/W) of every group, as Flow-GRPO's sampler does: rewards, masks and the features of
  every perceptual space are all-gathered (B x D per space), so each group's entropy covers all of it.
- Seeding: each sample's noise comes from its own generator, seeded by (run seed, step, global index),
  so the samples do not depend on the number of processes.
- Gradients: DDP (torch's composable `replicate`) over the LoRA adapters, reduced during the backward of a
  minibatch's last micro-batch; FSDP2 (`fully_shard`) for full fine-tuning, reduce-scattered at every
  backward (gradients accumulate sharded). The finiteness decision is taken on the reduced gradient (and
  the all-reduced loss), so every rank takes the same one.
- Memory: with LoRA every rank holds the whole frozen base model (loaded as with one process). With full
  fine-tuning no rank ever holds a whole transformer: it is built on the meta device, sharded block by
  block, and each rank reads only its rows of the safetensors weights (`load_sharded_transformer`); the KL
  reference is built the same way.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pec.config import PLACEMENTS

if TYPE_CHECKING:
    from pec.models.base import FlowModel, WeightFiles


@dataclass(frozen=True)
class Placement:
    """Which samples of a step's global batch this rank generates.

    prompt_slots: indices (into the step's list of G prompts) of the groups this rank samples.
    group_size: samples per group on this rank (K for contiguous, K/W for spread).
    global_index: (B_local,) global sample indices g*K + j of the local samples, in local order.
    """

    prompt_slots: list[int]
    group_size: int
    global_index: torch.Tensor


class DistContext:
    """The process group of a run and collective helpers that are identities with one process."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @classmethod
    def from_env(cls, device: str, timeout_s: float) -> DistContext:
        """Join the process group torchrun describes in the environment (none: a one-process context).

        Args:
            device: the run's --device ("auto", "cpu", "cuda", ...); with several processes on GPUs
                each takes cuda:LOCAL_RANK.
            timeout_s: how long a collective waits for a peer before failing.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world_size, local_rank)

    @property
    def active(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes metrics, grids and checkpoints."""
        return self.rank == 0

    def device(self, name: str) -> str:
        """The device this rank trains on, for the run's --device `name`."""
        if self.active and name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return name

    def check_layout(self, prompts_per_step: int, group_size: int, placement: str, method: str, pcgs_form: str,
                     generation_density: str) -> None:
        """Reject a global batch or method that cannot be laid out on the ranks, saying what to change."""
        if placement not in PLACEMENTS:
            raise ValueError(f"dist.placement must be one of {list(PLACEMENTS)}, got {placement!r}")
        w = self.world_size
        if (w > 1 and placement == "spread" and method == "pcgs" and pcgs_form == "reward"
                and generation_density == "latent_group"):
            raise ValueError("--pcgs.generation_density latent_group fits each group's latents on one rank: use "
                             "--dist.placement contiguous")
        if placement == "contiguous" and prompts_per_step % w:
            raise ValueError(f"dist.placement contiguous puts whole groups on ranks: sampling.prompts_per_step "
                             f"({prompts_per_step}) must divide by the {w} processes; change it, or use "
                             f"--dist.placement spread")
        if placement == "spread" and group_size % w:
            raise ValueError(f"dist.placement spread splits every group over the ranks: sampling.group_size "
                             f"({group_size}) must divide by the {w} processes; change it, or use "
                             f"--dist.placement contiguous")

    def placement(self, prompts_per_step: int, group_size: int, placement: str, rank: int | None = None
                  ) -> Placement:
        """The samples `rank` (default: this rank) generates in a step (see the module docstring)."""
        w, r = self.world_size, self.rank if rank is None else rank
        if placement == "contiguous":
            per = prompts_per_step // w
            slots = list(range(r * per, (r + 1) * per))
            index = torch.arange(r * per * group_size, (r + 1) * per * group_size)
            return Placement(slots, group_size, index)
        per = group_size // w
        j = torch.arange(r * per, (r + 1) * per)
        index = (torch.arange(prompts_per_step)[:, None] * group_size + j[None, :]).reshape(-1)
        return Placement(list(range(prompts_per_step)), per, index)

    # -- collectives (identities with one process) ---------------------------------------------
    def all_gather(self, t: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate every rank's `t` (same shape on all ranks) along dim 0. With `order`, the global
        index of each gathered row (every rank's `Placement.global_index`, rank after rank: fixed for a
        run, so computed once, see `gather_order`), rows are put in global order instead."""
        if not self.active:
            return t
        t = t.contiguous()
        gathered = torch.empty((self.world_size * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
        if t.dtype == torch.bool:  # gloo and NCCL gather bytes, not bools
            gather(gathered.view(torch.uint8), t.view(torch.uint8))
        else:
            gather(gathered, t)
        if order is None:
            return gathered
        out = torch.empty_like(gathered)
        out[order] = gathered
        return out

    def gather_group_samples(self, groups: torch.Tensor) -> torch.Tensor:
        """Differentiable gather of spread groups: this rank's (G, n/W, D) -> every rank's (G, n, D), samples
        in global order. Each rank then computes the same function of all of it; the backward sums its
        W copies of the gradient onto each rank's own samples, so divide what is differentiated by W
        where the scale matters (the guidance shift is normalised per sample: it does not)."""
        if not self.active:
            return groups
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(groups.contiguous()), dim=1)

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce of `t` ("sum", "max" or "min"); returns it."""
        if self.active:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                   "min": dist.ReduceOp.MIN}[op])
        return t

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def gather_order(placements: list[Placement], device: torch.device | str) -> torch.Tensor | None:
    """The `order` argument of `DistContext.all_gather` for these placements (one per rank): None where
    rank after rank already is the global order (contiguous placement, or one process)."""
    order = torch.cat([p.global_index for p in placements])
    if torch.equal(order, torch.arange(order.shape[0])):
        return None
    return order.to(device)


def sample_noise(global_index: torch.Tensor, shape: tuple[int, ...], num_steps: int, seed: int,
                 device: torch.device | str, shared_group: int | None = None) -> torch.Tensor:
    """(num_steps + 1, B, *shape) standard normal noise, each sample's drawn from a generator seeded by
    (seed, its global index), so a sample's noise never depends on the batch split.

    With `shared_group` (the group size K), the initial noise noise[0] of every sample is its group's:
    drawn from a generator seeded by (seed, global index // K), so all K samples of a prompt start from
    the same latent (MixGRPO), on whichever ranks they live; the per-step noise stays per sample.
    Drawn on the CPU (float32) and moved to `device`: the same on every device and process count.
    """
    out = torch.empty((num_steps + 1, global_index.shape[0], *shape))
    for b, g in enumerate(global_index.tolist()):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + g * 2_654_435_761) % (2**63 - 1))
        out[:, b] = torch.randn((num_steps + 1, *shape), generator=gen)
        if shared_group is not None:
            group = torch.Generator().manual_seed((seed * 1_000_003 + (g // shared_group) * 2_654_435_761
                                                   + 0x5EED) % (2**63 - 1))
            out[0, b] = torch.randn(shape, generator=group)
    return out.to(device, non_blocking=True)  # no host sync (pageable memory is staged synchronously)


def minibatch_plan(global_index: torch.Tensor, micro_batch: int, minibatches: int, generator: torch.Generator
                   ) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """One rank's shuffled minibatches.

    Args:
        global_index: the global indices of the rank's samples, in its local order.
        micro_batch: samples per forward pass; the rank's rollout ran its samples in consecutive chunks
            of this size.
        minibatches: optimizer updates per step.
        generator: seeded by (seed, step), the same on every rank.

    Returns:
        For each minibatch: (the rank's micro-batches as local index tensors, their global indices).
        Where the rank holds at least `minibatches` rollout chunks, whole chunks are shuffled, so each
        micro-batch re-evaluates exactly the rows, in the order and batch shape, that the rollout
        computed together (BLAS rounds a row differently elsewhere in a batch: only this makes the
        first ratio exactly 1); otherwise samples are shuffled one by one. Every rank draws the same
        permutation of equally many chunks, so all run the same number of forward and backward passes,
        which DDP and FSDP2 need; with one minibatch the union over ranks is the whole batch, as in a
        one-process run.
    """
    chunks = list(torch.arange(global_index.shape[0]).split(micro_batch))
    if len(chunks) >= minibatches:
        perm = torch.randperm(len(chunks), generator=generator)
        parts = [[chunks[i] for i in part.tolist()] for part in perm.tensor_split(minibatches)]
    else:
        order = torch.randperm(global_index.shape[0], generator=generator)
        parts = [list(mb.split(micro_batch)) if mb.numel() else [] for mb in order.tensor_split(minibatches)]
    return [(part, global_index[torch.cat(part)] if part else global_index[:0]) for part in parts]


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A regular tensor for `t`, gathering it when FSDP2 returned a DTensor (e.g. the gradient norm)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# The FSDP2 units of each transformer class: every block of these lists is one unit; the rest of the network
# (embeddings, output layers) is the network's root unit. By class name (a subclass or an FSDP2-wrapped class
# finds its base through the MRO), so that a new model fails loudly here instead of becoming one unit.
SHARD_BLOCKS: dict[str, tuple[str, ...]] = {
    "SD3Transformer2DModel": ("transformer_blocks",),
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "Flux2Transformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "QwenImageTransformer2DModel": ("transformer_blocks",),
    "WanTransformer3DModel": ("blocks",),
}


def transformer_networks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The networks of a FlowModel's transformer: its experts (Wan2.2 A14B's `WanExperts`), or itself."""
    experts = getattr(transformer, "experts", None)
    return list(experts) if isinstance(experts, torch.nn.ModuleList) else [transformer]


def shard_blocks(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of one network that FSDP2 shards one by one (`SHARD_BLOCKS`); ValueError for a class it
    does not know (which would otherwise be sharded as one unit: all-gathered whole in every forward)."""
    for cls in type(network).__mro__:
        if cls.__name__ in SHARD_BLOCKS:
            return [block for name in SHARD_BLOCKS[cls.__name__] for block in getattr(network, name)]
    raise ValueError(f"full fine-tuning on several processes shards a transformer block by block; "
                     f"{type(network).__name__} has no entry in pec.distributed.SHARD_BLOCKS naming its block lists")


def replicate_transformer(transformer: torch.nn.Module) -> None:
    """DDP for the trainable adapters (LoRA on several processes): torch's composable `replicate`, i.e.
    DistributedDataParallel applied in place (no wrapper: the adapters' and diffusers' attributes stay
    reachable). Gradients are averaged in its buckets during the backward of a minibatch's last pass;
    buffers are constant and not broadcast. The base model stays whole and frozen on every rank.

    With several experts (Wan2.2 A14B) a forward runs one of them, so a backward leaves the other's
    adapters without gradients: DDP must then look for unused parameters (`find_unused_parameters`),
    or its next forward fails waiting for their reduction. One network keeps the cheaper default."""
    from torch.distributed._composable import replicate

    replicate(transformer, broadcast_buffers=False,
              find_unused_parameters=len(transformer_networks(transformer)) > 1)


def uniform_trainable_dtype(transformer: torch.nn.Module) -> None:
    """FSDP2 reduces and updates the trainable parameters of a unit in one dtype. A network whose trainable
    parameters mix dtypes (Wan keeps its norms, time embedder and modulation tables in float32 beside
    bfloat16 weights, as diffusers loads it) gets every floating parameter in float32: an exact upcast, master
    weights that FSDP2 all-gathers in bfloat16 on GPUs (`shard_transformer`'s mp_policy) and updates in
    float32. Buffers keep their dtype. Cheap on a transformer still on the meta device."""
    for network in transformer_networks(transformer):
        if len({p.dtype for p in network.parameters() if p.requires_grad}) < 2:
            continue
        for module in network.modules():
            for name, param in module._parameters.items():
                if param is not None and param.is_floating_point() and param.dtype != torch.float32:
                    module._parameters[name] = torch.nn.Parameter(param.to(torch.float32),
                                                                  requires_grad=param.requires_grad)


def shard_transformer(transformer: torch.nn.Module, device: torch.device) -> None:
    """FSDP2 (`fully_shard`) over each block of each network (`shard_blocks`), then over the network
    (full fine-tuning on several processes): each rank keeps 1/W of the weights, gradients and optimizer
    moments. Each network is its own root (Wan2.2's two experts: two roots, the `WanExperts` around them
    holds no parameters), so that a network shared with another transformer (the frozen expert a KL
    reference shares with the policy) is sharded once and skipped here. Works on a transformer built on
    the meta device: its shards stay there until `load_sharded_transformer` materialises them. On GPUs
    the parameters are all-gathered in bf16 and gradients reduced in fp32; on CPU everything keeps its dtype."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for network in transformer_networks(transformer):
        if isinstance(network, FSDPModule):
            continue
        for block in shard_blocks(network):
            fully_shard(block, **kwargs)
        fully_shard(network, **kwargs)


def load_sharded_transformer(model: FlowModel, device: torch.device) -> None:
    """Shard a FlowModel's transformer built empty (`empty_transformer=True`: parameters on the meta
    device) and load this rank's rows of its weights: `shard_transformer`, then each network's local
    shards are allocated on `device` and filled from its safetensors files (`model.transformer_weights()`,
    `load_weight_shards`). No rank ever holds a whole network: the peak is this rank's shards plus one
    slice being copied. Every rank reads the files itself (no communication): they must be readable from
    every node. A network already loaded (shared with a transformer loaded before) is left as it is."""
    shard_transformer(model.transformer, device)
    for name, weights in model.transformer_weights().items():
        network = model.transformer.get_submodule(name)
        if not any(p.is_meta for p in network.parameters()):
            continue
        # to_empty for the meta tensors only (buffers built at construction are real and kept); the FSDP2
        # modules' `_apply` re-registers the padded local shards.
        network._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
        load_weight_shards(network, weights)


# safetensors' dtype names (its format's header), as torch dtypes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class SafetensorsRows:
    """Reads rows of the tensors of a safetensors file with plain reads: the format is an 8-byte header
    length, a JSON header (per tensor: dtype, shape, data_offsets) and the C-contiguous data, so rows
    [start, stop) of a tensor are one range of bytes. Unlike `safe_open`, nothing is memory-mapped: the
    process reads (and its resident set counts) exactly the bytes asked for. A context manager (closes the
    file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "rb")  # closed by __exit__
        try:
            size = int.from_bytes(self.file.read(8), "little")
            self.entries = json.loads(self.file.read(size))
            self.entries.pop("__metadata__", None)
        except (ValueError, MemoryError, OverflowError):
            self.file.close()
            raise ValueError(f"{path} is not a safetensors file (its header does not parse)") from None
        self.data_start = 8 + size

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of tensor `key`."""
        return tuple(self.entries[key]["shape"])

    def rows(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `key` (all of it by default) as a new CPU tensor."""
        entry, shape = self.entries[key], self.shape(key)
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {entry['dtype']}, which pec does not read")
        rows = shape if start is None else (stop - start, *shape[1:])
        out = torch.empty(rows, dtype=SAFETENSORS_DTYPES[entry["dtype"]])
        row_bytes = math.prod(shape[1:]) * out.element_size()
        self.file.seek(self.data_start + entry["data_offsets"][0] + (start or 0) * row_bytes)
        if self.file.readinto(out.reshape(-1).view(torch.uint8).numpy()) != out.numel() * out.element_size():
            raise ValueError(f"{self.path} is truncated (tensor {key!r})")
        return out

    def __enter__(self) -> SafetensorsRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


@torch.no_grad()
def load_weight_shards(module: torch.nn.Module, weights: WeightFiles) -> None:
    """Fill `module`'s parameters and persistent buffers from safetensors files, reading only what this rank
    holds: for a DTensor sharded on dim 0 (FSDP2), its rows [r * ceil(n/W), ...) (torch.chunk's split, which
    DTensor's Shard(0) uses); plain tensors whole (`SafetensorsRows`: one slice in host memory at a time).
    Values are cast to the tensor's dtype, as from_pretrained casts them. ValueError naming the file for a
    missing tensor or a shape that differs."""
    from torch.distributed.tensor import DTensor, Shard

    with contextlib.ExitStack() as stack:
        where = {}
        for file in weights.files:
            reader = stack.enter_context(SafetensorsRows(file))
            where.update(dict.fromkeys(reader.entries, reader))
        for name, tensor in module.state_dict(keep_vars=True).items():
            key = weights.prefix + name
            if key not in where:
                raise ValueError(f"{', '.join(map(str, weights.files))} holds no tensor {key!r}: not a checkpoint "
                                 f"of this model")
            reader = where[key]
            if reader.shape(key) != tuple(tensor.shape):
                raise ValueError(f"{key!r} has shape {reader.shape(key)} in {reader.path}, {tuple(tensor.shape)} "
                                 f"in the model")
            if not isinstance(tensor, DTensor):
                tensor.copy_(reader.rows(key))
                continue
            if tuple(tensor.placements) != (Shard(0),):
                raise ValueError(f"{name}: expected an FSDP2 shard on dim 0, got {tensor.placements}")
            local, rows = tensor.to_local(), tensor.shape[0]
            chunk = -(-rows // tensor.device_mesh.size())
            start = min(tensor.device_mesh.get_local_rank() * chunk, rows)
            stop = min(start + chunk, rows)
            if local.shape[0] != stop - start:
                raise RuntimeError(f"{name}: local shard of {local.shape[0]} rows, expected rows [{start}, {stop})")
            local.copy_(reader.rows(key, start, stop))


def reshard(module: torch.nn.Module) -> None:
    """Free the unsharded parameters FSDP2 holds in `module` (the root keeps its own after a forward, until
    a backward), so that its next forward gathers the shards again. Needed after the shards were written in
    place outside the optimizer (DiffusionNFT swaps its old policy in and out); a no-op without FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def _full_options(**kwargs: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, whole (gathered from FSDP shards) and on the CPU: the same
    checkpoint whatever the process count. Every rank must call it (a collective when sharded)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True, ignore_frozen_params=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # not the buffers
    on_cpu = next(model.parameters()).device.type == "cpu"
    # CPU tensors may be the live parameters themselves: copy them.
    return {k: v.detach().clone() if on_cpu else v for k, v in state.items() if k in trainable}


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `full_model_state` into a model, sharded or not."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_options(strict=False))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, whole and on the CPU (every rank must call it).
    Before the first update it is empty (torch's getter would otherwise run a zero step to create it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not optimizer.state:
        return {"state": {}, "param_groups": []}
    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True, ignore_frozen_params=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load `full_optimizer_state`, sharding it again where the model is sharded (an empty state, saved
    before the first update, leaves the fresh optimizer as it is)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not state["state"]:
        return
    set_optimizer_state_dict(model, optimizer, state, options=_full_options())
