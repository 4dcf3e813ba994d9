"""Bad weights for full fine-tuning's shard-by-shard loading (pec.distributed.load_sharded_transformer): a
one-line error naming the option or the file and tensor, before any training."""
import pytest
import torch
from safetensors.torch import save_file

from pec.config import Config, apply_dict
from pec.distributed import load_weight_shards
from pec.models import MODELS
from pec.models.base import WeightFiles
from pec.models.diffusers_model import component_weights
from pec.policy import Policy


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_component_folder_without_safetensors_names_the_option(tmp_path):
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError) as err:
        component_weights(tmp_path)
    assert _one_line(err).startswith("--model.path: ") and "safetensors" in str(err.value)


@pytest.mark.parametrize("stored, expected", [
    ({"weight": torch.zeros(3, 2)}, "holds no tensor 'net.bias'"),
    ({"weight": torch.zeros(2, 2), "bias": torch.zeros(3)}, "'net.weight' has shape (2, 2) in"),
])
def test_a_checkpoint_of_another_model_names_the_file_and_tensor(tmp_path, stored, expected):
    save_file({f"net.{k}": v for k, v in stored.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError) as err:
        load_weight_shards(torch.nn.Linear(2, 3), WeightFiles((tmp_path / "w.safetensors",), "net."))
    assert expected in _one_line(err)


def test_a_file_that_is_not_safetensors_names_it(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x05" + bytes(7) + b"abcde")
    with pytest.raises(ValueError) as err:
        load_weight_shards(torch.nn.Linear(2, 3), WeightFiles((tmp_path / "w.safetensors",), "net."))
    assert _one_line(err) == f"{tmp_path / 'w.safetensors'} is not a safetensors file (its header does not parse)"


def test_a_model_that_cannot_load_empty_is_refused_for_sharded_full_fine_tuning():
    from pec.models.embedded import EmbeddedFlowModel

    if "whole_only" not in MODELS.names():  # a loader without the empty_transformer option
        MODELS.register("whole_only")(lambda cfg, device: EmbeddedFlowModel.from_pretrained(device=device))
    cfg = Config()
    apply_dict(cfg, {"device": "cpu", "model": {"name": "whole_only"}, "train": {"lora": False}})
    with pytest.raises(ValueError) as err:
        Policy(cfg, torch.device("cpu"), shard=True)
    assert _one_line(err).startswith("--model.name whole_only: its loader cannot build the transformer empty")
