"""Bad input for `--model.name qwen_image`, through `python -m pec.train`'s main(argv): a folder of another
pipeline class, a folder of the wrong architecture and a prompt length the pipeline refuses are each one
line on stderr naming the option, exit code 2, before any weight loads and before the run folder exists.

The folders hold only the JSON files the check reads (model_index.json, transformer/config.json)."""
import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared helpers in tests/
from _refusals import refused_by_train  # noqa: E402


def _folder(tmp_path: Path, pipeline: str, transformer: str) -> Path:
    """A diffusers-layout folder of `pipeline` whose transformer/config.json names `transformer`."""
    folder = tmp_path / pipeline
    parts = {"transformer": ["diffusers", transformer], "vae": ["diffusers", "AutoencoderKLQwenImage"],
             "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
             "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    for name in parts:
        (folder / name).mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **parts}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": transformer}))
    return folder


@pytest.mark.parametrize("pipeline,transformer,expected", [
    ("StableDiffusion3Pipeline", "SD3Transformer2DModel",
     r"--model.path must be a diffusers folder of a QwenImagePipeline .*holds a StableDiffusion3Pipeline"),
    ("QwenImagePipeline", "FluxTransformer2DModel",
     r"--model.path .*its transformer is a FluxTransformer2DModel, not a QwenImageTransformer2DModel"),
])
def test_a_folder_of_another_model_is_one_line_naming_model_path(tmp_path, capsys, pipeline, transformer, expected):
    line = refused_by_train(["--model.name", "qwen_image", "--model.path", str(_folder(tmp_path, pipeline, transformer)),
                     "--sampling.guidance_scale", "4"], tmp_path, capsys)
    assert re.search(expected, line), line


def test_a_qwen_image_folder_under_another_name_says_which(tmp_path, capsys):
    folder = _folder(tmp_path, "QwenImagePipeline", "QwenImageTransformer2DModel")
    line = refused_by_train(["--model.name", "sd3", "--model.path", str(folder)], tmp_path, capsys)
    assert "--model.path" in line and "holds a QwenImagePipeline" in line and "--model.name" in line


def test_a_prompt_length_over_the_pipelines_limit_names_the_option(tmp_path, capsys):
    folder = _folder(tmp_path, "QwenImagePipeline", "QwenImageTransformer2DModel")
    line = refused_by_train(["--model.name", "qwen_image", "--model.path", str(folder), "--model.max_sequence_length",
                     "2048"], tmp_path, capsys)
    assert "--model.max_sequence_length must be in [1, 1024] for qwen_image" in line
