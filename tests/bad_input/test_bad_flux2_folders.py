"""Bad input for `--model.name flux2` (FLUX.2 dev / klein) through `python -m pec.train`'s main: a folder
of another pipeline class, and CFG on a FLUX.2 that has no CFG forward, are each one line naming the
option, before any weight loads. The folders hold only the JSON files the checks read (no weights)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared helpers in tests/

from pec.train import main as train_main  # noqa: E402

COMPONENTS = {"Flux2Pipeline": ("Flux2Transformer2DModel", {"text_encoder": "Mistral3ForConditionalGeneration",
                                                              "tokenizer": "PixtralProcessor"}),
              "Flux2KleinPipeline": ("Flux2Transformer2DModel", {"text_encoder": "Qwen3ForCausalLM",
                                                                 "tokenizer": "Qwen2Tokenizer"}),
              "FluxPipeline": ("FluxTransformer2DModel", {"text_encoder": "CLIPTextModel", "tokenizer": "CLIPTokenizer",
                                                          "text_encoder_2": "T5EncoderModel",
                                                          "tokenizer_2": "T5TokenizerFast"})}


def _folder(tmp_path: Path, pipeline: str, **extra) -> Path:
    """A diffusers folder's JSON skeleton: model_index.json, component folders, transformer/config.json."""
    transformer, text = COMPONENTS[pipeline]
    folder = tmp_path / pipeline
    index = {"_class_name": pipeline, "transformer": ["diffusers", transformer], "vae": ["diffusers", "VAE"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             **{name: ["transformers", cls] for name, cls in text.items()}, **extra}
    for name, value in index.items():
        if isinstance(value, list):
            (folder / name).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": transformer}))
    return folder


def _one_line_error(argv: list[str], tmp_path: Path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_main([*argv, "--run-dir", str(tmp_path / "run")])
    message = str(exit_info.value)
    assert exit_info.value.code == 2, message
    assert "\n" not in message and "Traceback" not in message, message
    assert not (tmp_path / "run").exists()
    return message


@pytest.mark.parametrize("name,pipeline", [("flux2", "FluxPipeline"), ("flux", "Flux2KleinPipeline"),
                                           ("flux", "Flux2Pipeline")])
def test_a_folder_of_another_pipeline_class_names_model_path(tmp_path, name, pipeline):
    message = _one_line_error(["--model.name", name, "--model.path", str(_folder(tmp_path, pipeline))], tmp_path)
    assert "--model.path" in message and f"holds a {pipeline}" in message and "--model.name" in message, message


@pytest.mark.parametrize("pipeline,extra", [("Flux2Pipeline", {}), ("Flux2KleinPipeline", {"is_distilled": True})])
def test_cfg_on_a_flux2_without_a_cfg_forward_names_the_guidance_scale(tmp_path, pipeline, extra):
    folder = _folder(tmp_path, pipeline, **extra)
    message = _one_line_error(["--model.name", "flux2", "--model.path", str(folder), "--sampling.guidance_scale",
                               "4"], tmp_path)
    assert "--sampling.guidance_scale must be 1 for flux2" in message, message
    assert ("--model.guidance" in message) == (pipeline == "Flux2Pipeline"), message
