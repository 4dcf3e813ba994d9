"""Full fine-tuning on several processes loads no transformer whole (issue 19, item 4): built on the meta
device, sharded block by block under FSDP2, each rank reading only its rows of the safetensors weights; the
KL reference the same way. DDP (LoRA) over Wan2.2's two experts finds the unused one.

The 2-process checks run once, in one torchrun launch of tests/_sharded_worker.py (gloo), whose module
docstring says how memory is measured and what that measure can and cannot see.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pec.distributed import SafetensorsRows, shard_blocks, transformer_networks
from pec.experiments.tiny_world import write_tiny_world
from pec.models.embedded import EmbeddedConfig, EmbeddedFlowModel
from tests._tiny_diffusers import tiny_sd3_folder
from tests._tiny_wan import tiny_wan_folder

TESTS = Path(__file__).parent
# An SD3 transformer of 54.6M float32 parameters (218 MB) in the embedded model's layout.
BIG = EmbeddedConfig(num_layers=6, attention_head_dim=64, num_attention_heads=8)
# What a rank may hold of the policy and its KL reference together, as a share of the two whole copies.
LOAD_BOUND = 0.7


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    world = write_tiny_world(tmp / "world")
    torch.manual_seed(0)
    EmbeddedFlowModel(BIG).save(tmp / "big")
    wan22, sd3 = tiny_wan_folder(tmp, "wan22"), tiny_sd3_folder(tmp, t5=False)
    out = tmp / "out"
    out.mkdir()
    # A fixed mmap threshold: freed tensors leave the resident set at once (see the worker's docstring).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "_sharded_worker.py"), str(world), str(tmp / "big"), str(wan22), str(sd3), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_no_rank_ever_holds_a_whole_policy_or_reference(ranks):
    """Building the policy and its KL reference peaks well below two whole copies on each rank, where
    loading them whole (as before) exceeds that bound; one training step then adds no more than the
    optimizer's moments and gradients of the rank's shards, plus one share for activations and the block
    being gathered. The loaded values are the file's."""
    for rank in ranks:
        memory = rank["memory"]
        model, peaks = memory["model_bytes"], memory["peaks"]
        bound = LOAD_BOUND * 2 * model  # the policy and its reference
        assert peaks["naive_load"] > bound, (peaks, model)  # the measure sees whole copies
        assert peaks["load"] < bound, (peaks, model)
        assert memory["held_bytes"] == [model // 2, model // 2]  # 2 ranks: half of each
        share = memory["held_bytes"][0]
        assert memory["moment_bytes"] == 2 * share  # AdamW's two moments, sharded
        assert peaks["step"] < memory["moment_bytes"] + share + share, (peaks, share)
        assert memory["exact"] and torch.isfinite(torch.tensor(memory["loss"]))


def test_sharded_models_are_the_checkpoints_and_compute_what_whole_ones_do(ranks):
    for rank in ranks:
        for label, checks in rank["diffusers"].items():
            if label == "ddp_two_experts":
                continue
            for which in ("policy", "reference"):
                assert checks[f"{which}_keys"] and checks[f"{which}_exact"] and checks[f"{which}_buffers"], label
            assert checks["every_block_a_unit"], label
            assert checks.get("velocity_exact", True) and checks.get("frozen_expert_shared", True), label
        diffusers = rank["diffusers"]
        # Each Wan expert is its own FSDP2 root with its `blocks` as units (one block in the tiny model).
        assert diffusers["wan22_both"]["units"] == [["FSDPWanTransformerBlock", "FSDPWanTransformer3DModel"]] * 2
        assert diffusers["sd3"]["units"] == [["FSDPJointTransformerBlock", "FSDPSD3Transformer2DModel"]]
        # Wan keeps some modules in float32 beside bfloat16: a trained expert becomes float32 throughout
        # (FSDP2 updates a unit in one dtype); the frozen expert keeps the dtypes it loads with.
        sharded, whole = diffusers["wan22_high"]["dtypes"]
        assert whole == [["torch.bfloat16", "torch.float32"]] * 2
        assert sharded == [["torch.float32"], ["torch.bfloat16", "torch.float32"]]
        assert diffusers["sd3"]["dtypes"] == [[["torch.float32"]], [["torch.float32"]]]


def test_ddp_over_both_wan22_experts_reduces_each_backward(ranks):
    """Each backward runs one expert: without find_unused_parameters DDP's next forward fails."""
    for rank in ranks:
        ddp = rank["diffusers"]["ddp_two_experts"]
        assert ddp["error"] is None, ddp["error"]
        assert ddp["same_on_ranks"] == [True, True, True]
        assert ddp["experts_reached"] == [["0"], ["1"], ["0"]]


# ---------------------------------------------------------------------------------------------- one process


def _tiny_transformers() -> list[torch.nn.Module]:
    """Each adapter's transformer class, two blocks of each list, on the meta device."""
    import diffusers

    from tests._tiny_flux2 import _transformer as flux2_transformer

    with torch.device("meta"):
        return [
            diffusers.SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                            caption_projection_dim=16, pooled_projection_dim=32, out_channels=4),
            diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=(2, 2, 4)),
            flux2_transformer(False),
            diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                  attention_head_dim=8, num_attention_heads=2,
                                                  joint_attention_dim=32, axes_dims_rope=(2, 2, 4)),
            diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                            in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                            num_layers=2)]


def test_every_models_blocks_are_its_fsdp_units():
    """Each adapter's transformer: the blocks FSDP2 shards one by one are exactly the modules diffusers
    declares unsplittable (`_no_split_modules`), so no block list is missed (Wan's is `blocks`)."""
    for network in _tiny_transformers():
        declared = [m for m in network.modules() if type(m).__name__ in network._no_split_modules]
        assert shard_blocks(network) == declared and len(declared) >= 2, type(network).__name__
        assert transformer_networks(network) == [network]


def test_a_transformer_of_unknown_blocks_is_refused():
    with pytest.raises(ValueError, match="no entry in pec.distributed.SHARD_BLOCKS"):
        shard_blocks(torch.nn.Linear(2, 2))


def test_empty_model_builds_what_from_pretrained_builds_without_storage(tmp_path):
    """Parameters on the meta device with from_pretrained's dtypes (Wan's float32 modules in a bfloat16
    model), buffers built at construction real and equal (the rotary tables)."""
    import diffusers

    from pec.models.diffusers_model import empty_model

    folder = tiny_wan_folder(tmp_path, "wan21") / "transformer"
    empty = empty_model(folder, torch.bfloat16)
    loaded = diffusers.WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert all(p.is_meta for p in empty.parameters())
    assert {n: p.dtype for n, p in empty.named_parameters()} == {n: p.dtype for n, p in loaded.named_parameters()}
    assert {p.dtype for p in empty.parameters()} == {torch.bfloat16, torch.float32}
    buffers = dict(loaded.named_buffers())
    assert [n for n, _ in empty.named_buffers()] == list(buffers)
    assert all(torch.equal(b, buffers[n]) for n, b in empty.named_buffers())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_safetensors_rows_read_the_rows_asked_for(tmp_path, dtype):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(5, 3, 2).to(dtype), "b": torch.randn(4).to(dtype), "c": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    with SafetensorsRows(tmp_path / "x.safetensors") as reader:
        assert torch.equal(reader.rows("a", 3, 5), tensors["a"][3:5])
        assert torch.equal(reader.rows("a", 5, 5), tensors["a"][5:5])  # an empty shard (more ranks than rows)
        assert torch.equal(reader.rows("b"), tensors["b"]) and torch.equal(reader.rows("c"), tensors["c"])
        assert reader.shape("a") == (5, 3, 2)
