"""Checks of full fine-tuning's sharded loading and of DDP over two experts, run in each of 2 processes:
    MALLOC_MMAP_THRESHOLD_=1048576 torchrun --standalone --nproc_per_node 2 tests/_sharded_worker.py \
        WORLD MODEL_DIR WAN22_DIR SD3_DIR OUT
Each rank writes OUT/rank{r}.json (what tests/test_sharded_loading.py asserts): `memory_case` first, in a
fresh process, then `diffusers_case`. Not a test module.

Memory is the process's resident set: its peak (VmHWM, reset through /proc/self/clear_refs after
malloc_trim) minus its size when the window opens. It counts every byte the process touches (tensors,
allocator slack, Python objects, thread stacks), so it can only over-state what the loading path holds;
the test runs the ranks with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_) so that a freed
tensor's pages leave the resident set at once instead of lingering in malloc's arenas. The naive path is
measured after it in the same process, where freed memory could be reused without growing the resident
set, so it can only under-state the naive peak. Library code is imported before the windows open.
"""
import copy
import ctypes
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))

from _dist_worker import dist_config  # noqa: E402
from pec.config import Config, apply_dict  # noqa: E402
from pec.distributed import DistContext, shard_blocks, transformer_networks  # noqa: E402
from pec.models import MODELS  # noqa: E402
from pec.policy import Policy  # noqa: E402

_LIBC = ctypes.CDLL("libc.so.6")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def open_window() -> int:
    """Return freed heap to the OS, reset the peak resident set to the current one; the current one (bytes)."""
    gc.collect()
    _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def window_peak(opened: int) -> int:
    """Bytes the resident set grew by at its peak since `open_window` returned `opened`."""
    return _status_kib("VmHWM") * 1024 - opened


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def memory_case(world: Path, model_dir: Path, out: Path) -> dict:
    """Full fine-tuning with a KL reference on the ~200 MB model of `model_dir`: the peak of building the
    policy and its reference (sharded), their values against the file, the peak of one training step, then
    the naive path (every rank loads the whole model and deep-copies it) in the same process."""
    from safetensors.torch import load_file

    # Library code imported before any window opens (diffusers' model classes alone are ~70 MB resident).
    import accelerate  # noqa: F401
    import pec.models.embedded  # noqa: F401
    from pec.trainer import Trainer

    cfg = dist_config(world, out / "run", "contiguous", 1, model={"path": str(model_dir)},
                      train={"lora": False, "kl_beta": 0.01, "micro_batch": 4, "timestep_fraction": 0.5})
    peaks = {}
    build = Policy.__init__

    def measured(self, *args, **kwargs):
        opened = open_window()
        build(self, *args, **kwargs)
        peaks["load"] = window_peak(opened)

    Policy.__init__ = measured
    try:
        trainer = Trainer(cfg)
    finally:
        Policy.__init__ = build
    policy = trainer.policy
    model_bytes = sum(p.numel() * p.element_size() for p in policy.model.transformer.parameters())
    held = [_local_bytes(m.transformer) for m in (policy.model, policy._reference)]
    # Every tensor of the policy and of the reference, gathered, equals the file's.
    file = load_file(str(model_dir / "model.safetensors"))
    exact = all(torch.equal(_whole(t), file["transformer." + name])
                for m in (policy.model, policy._reference) for name, t in m.transformer.state_dict().items())
    del file
    opened = open_window()
    row = trainer.train_step(1)  # one step, without the checkpoint that `run` writes (gathered whole on rank 0)
    peaks["step"] = window_peak(opened)
    moments = sum(_share_bytes(v) for state in trainer.optimizer.state.values() for k, v in state.items()
                  if k != "step")
    del trainer, policy
    opened = open_window()
    naive = MODELS.build(cfg.model.name, cfg=cfg.model, device=torch.device("cpu"))
    reference = copy.deepcopy(naive)
    peaks["naive_load"] = window_peak(opened)
    del naive, reference
    return {"model_bytes": model_bytes, "held_bytes": held, "moment_bytes": moments, "peaks": peaks,
            "exact": exact, "loss": row["loss"]}


def _share_bytes(t: torch.Tensor) -> int:
    """Bytes of this rank's part of `t` (its local shard for a DTensor)."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _local_bytes(module: torch.nn.Module) -> int:
    return sum(_share_bytes(p) for p in module.parameters())


def _config(name: str, path: Path, dtype: str, lora: bool, **model) -> Config:
    cfg = Config()
    apply_dict(cfg, {"device": "cpu", "model": {"name": name, "path": str(path), "dtype": dtype, "resolution": 32,
                                                "max_sequence_length": 8, **model},
                     "train": {"lora": lora, "kl_beta": 0.0 if lora else 0.01, "lora_rank": 4}})
    return cfg


def _velocity(model, seed: int, expert: int = 0, encoder=None) -> torch.Tensor:
    """`model`'s velocity on seeded latents, with prompts encoded by `encoder` (default: `model`)."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((2, *model.sample_shape), generator=gen)
    prompts = (encoder or model).encode_prompts(["a red car", "a dog"])
    with model.use_expert(expert):
        return model.velocity(latents, torch.tensor([0.9, 0.3]), prompts)


def _checkpoint(model) -> dict[str, torch.Tensor]:
    """The folder's tensors of every network of `model.transformer`, by their names in it."""
    from safetensors.torch import load_file

    return {f"{name}.{key}" if name else key: tensor for name, weights in model.transformer_weights().items()
            for file in weights.files for key, tensor in load_file(str(file)).items()}


def diffusers_case(wan22: Path, sd3: Path, out: Path) -> dict:
    """Sharded full fine-tuning of a Wan2.2 A14B folder (bf16, in which Wan keeps some modules in float32)
    and an SD3 folder (float32), against the folder's tensors and against the model loaded whole; then DDP
    (LoRA) over both Wan2.2 experts."""
    from torch.distributed.fsdp import FSDPModule

    result = {}
    cases = [("wan22_both", "wan", wan22, "bfloat16", {"frames": 5}),
             ("wan22_high", "wan", wan22, "bfloat16", {"frames": 5, "train_experts": "high"}),
             ("sd3", "sd3", sd3, "float32", {"t5": False})]
    for label, name, path, dtype, extra in cases:
        cfg = _config(name, path, dtype, lora=False, **extra)
        whole = MODELS.build(name, cfg=cfg.model, device=torch.device("cpu"))
        policy = Policy(cfg, torch.device("cpu"), shard=True)
        checks = {}
        checkpoint = _checkpoint(policy.model)
        for which, model in (("policy", policy.model), ("reference", policy._reference)):
            state = {k: _whole(t) for k, t in model.transformer.state_dict().items()}
            checks[f"{which}_keys"] = sorted(state) == sorted(whole.transformer.state_dict())
            # The checkpoint's values in the tensor's dtype, as from_pretrained casts them.
            checks[f"{which}_exact"] = all(torch.equal(t, checkpoint[k].to(t.dtype)) for k, t in state.items())
            buffers = dict(whole.transformer.named_buffers())  # the non-persistent ones too (rotary tables)
            checks[f"{which}_buffers"] = all(torch.equal(b, buffers[n]) for n, b in model.transformer.named_buffers())
            checks[f"{which}_held_fraction"] = _local_bytes(model.transformer) / sum(
                p.numel() * p.element_size() for p in whole.transformer.parameters())
        networks = transformer_networks(policy.model.transformer)
        # Per network: its parameters' dtypes sharded, and loaded whole.
        checks["dtypes"] = [[sorted({str(p.dtype) for p in n.parameters()}) for n in networks],
                            [sorted({str(p.dtype) for p in n.parameters()})
                             for n in transformer_networks(whole.transformer)]]
        checks["units"] = [[type(b).__name__ for b in shard_blocks(n)] + [type(n).__name__] for n in networks]
        checks["every_block_a_unit"] = all(isinstance(m, FSDPModule) for n in networks for m in [n, *shard_blocks(n)])
        if label == "wan22_high":  # the frozen low-noise expert: one sharded copy, shared by the reference
            checks["frozen_expert_shared"] = policy._reference.transformer.experts[1] is networks[1]
        else:  # the same computation as the model loaded whole in float32
            whole = MODELS.build(name, cfg=_config(name, path, "float32", lora=False, **extra).model,
                                 device=torch.device("cpu"))
            checks["velocity_exact"] = all(torch.equal(_velocity(policy.model, 3, e),
                                                       _velocity(whole, 3, e, encoder=policy.model))
                                           for e in range(len(networks)))
        result[label] = checks
        del whole, policy
    result["ddp_two_experts"] = ddp_two_experts(wan22)
    return result


def ddp_two_experts(wan22: Path) -> dict:
    """LoRA on both Wan2.2 experts under DDP: one backward through each expert, gradients reduced each time
    (what a minibatch's last micro-batch does), with gradient checkpointing as the Wan configs; each rank
    trains on its own latents."""
    policy = Policy(_config("wan", wan22, "float32", lora=True, frames=5, gradient_checkpointing=True),
                    torch.device("cpu"), shard=True)
    grads = []
    try:
        for expert in (0, 1, 0):
            policy.gradient_sync(True)
            _velocity(policy.model, 10 + dist.get_rank(), expert).square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None})
            policy.model.zero_grad(set_to_none=True)
    except RuntimeError as err:
        return {"error": str(err).splitlines()[0]}
    # Reduced: every rank holds the same gradient, and each pass reached only its expert's adapters.
    same = []
    for g in grads:
        flat = torch.cat([t.flatten() for _, t in sorted(g.items())])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        same.append(all(torch.equal(gathered[0], x) for x in gathered))
    reached = [sorted({n.split(".")[2] for n, t in g.items() if t.abs().sum() > 0}) for g in grads]
    return {"error": None, "same_on_ranks": same, "experts_reached": reached}


if __name__ == "__main__":
    world, model_dir, wan22, sd3, out = map(Path, sys.argv[1:])
    context = DistContext.from_env("cpu", 120)
    result = {"memory": memory_case(world, model_dir, out), "diffusers": diffusers_case(wan22, sd3, out)}
    context.close()
    (out / f"rank{context.rank}.json").write_text(json.dumps(result))
