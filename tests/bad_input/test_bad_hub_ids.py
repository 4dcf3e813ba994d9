"""Bad hub ids (`pec.hub`), through `python -m pec.train`'s main(argv), offline with sockets refused: each is
one line on stderr naming the option, exit code 2, before any weight loads and before the run folder exists.
A hub folder without safetensors weights (only pickles) and a pipeline whose components come from another
library than diffusers or transformers (code the folder ships) are refused; so are ids of the wrong shape.

The cached repositories hold only what the checks read (JSON files, and weight files by name)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared helpers in tests/
from _hub_cache import cache_repo, commit_of  # noqa: E402
from _refusals import refused_by_train  # noqa: E402

from pec.checks import check_run  # noqa: E402
from pec.config import parse_config  # noqa: E402

SD3_PARTS = {"transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "text_encoder_3": [None, None],
             "tokenizer_3": [None, None], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}


def _pipeline(folder: Path, parts: dict, transformer_weights: str) -> Path:
    """An SD3-layout folder: model_index.json naming `parts`, a config.json and a weights file per model."""
    for name, (library, cls) in parts.items():
        if library is None:
            continue
        (folder / name).mkdir(parents=True)
        if name.startswith(("transformer", "vae", "text_encoder")):
            (folder / name / "config.json").write_text(json.dumps({"_class_name": cls}))
            weights = transformer_weights if name == "transformer" else "model.safetensors"
            (folder / name / weights).write_bytes(b"weights")
        else:
            config = "scheduler_config.json" if name == "scheduler" else "tokenizer_config.json"
            (folder / name / config).write_text("{}")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", **parts}))
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch, no_network):
    """HF_HOME (offline) holding org/pickled (its transformer only as a .bin), org/custom-code (a transformer of
    the library 'my_code'), org/tiny (an SD3 folder with safetensors), org/pickled-dino (pytorch_model.bin)."""
    cache = tmp_path / "hf" / "hub"
    cache_repo(cache, "org/pickled", _pipeline(tmp_path / "p", SD3_PARTS, "diffusion_pytorch_model.bin"), commit_of(1))
    custom = {**SD3_PARTS, "transformer": ["my_code", "MyTransformer"]}
    cache_repo(cache, "org/custom-code", _pipeline(tmp_path / "c", custom, "diffusion_pytorch_model.safetensors"),
               commit_of(2))
    cache_repo(cache, "org/tiny", _pipeline(tmp_path / "t", SD3_PARTS, "diffusion_pytorch_model.safetensors"),
               commit_of(3))
    dino = tmp_path / "d"
    dino.mkdir()
    (dino / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    (dino / "pytorch_model.bin").write_bytes(b"pickle")
    cache_repo(cache, "org/pickled-dino", dino, commit_of(4))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("argv,expected", [
    (["--model.name", "sd3", "--model.t5", "false", "--model.path", "org/pickled"],
     "--model.path: org/pickled (commit {}) has no safetensors weights (transformer/*.safetensors) in the Hugging "
     "Face cache {{cache}}: pec takes only safetensors from the hub (pickled .bin weights can run code); choose a "
     "revision that has them, or convert them into a local folder; if the hub has them, fetch them with "
     "`hf download org/pickled` (HF_HUB_OFFLINE is set)".format(commit_of(1))),
    (["--model.name", "sd3", "--model.t5", "false", "--model.path", "org/custom-code"],
     "has components of other libraries than diffusers and transformers ({'transformer': 'my_code'}"),
    (["--model.name", "sd3", "--model.t5", "false", "--model.path", "org/tiny:v1"],
     "--model.path org/tiny:v1: give its revision with --model.revision v1, not after ':'"),
    (["--model.name", "sd3", "--model.t5", "false", "--model.path", "org/tiny/transformer"],
     "--model.path org/tiny/transformer: a hub id of a folder names a repository, ORG/NAME"),
    (["--model.revision", "v1"], "--model.revision 'v1' needs --model.path to name a hub id ORG/NAME"),
    (["--reward", "aesthetic", "--paths.aesthetic", "org/heads"],
     "--paths.aesthetic org/heads: this option takes a file; name it in the repository, ORG/NAME/FILE"),
    (["--perceptual.spaces", "dino", "--perceptual.space", "dino", "--method", "pec", "--paths.dino",
      "org/pickled-dino"],
     "--paths.dino: org/pickled-dino (commit {}) has no safetensors weights (model.safetensors or "
     "model.safetensors.index.json)".format(commit_of(4))),
    (["--model.path", "org/pickled-dino"],  # the embedded model's folder: config.json + model.safetensors
     "--model.path: org/pickled-dino (commit {}) has no safetensors weights".format(commit_of(4))),
    (["--model.path", "org/tiny"],  # a pipeline id without its --model.name: the embedded model's folder
     "--model.path: org/tiny is a diffusers pipeline (StableDiffusion3Pipeline, model_index.json), not a model "
     "folder (config.json + model.safetensors): choose its model with --model.name"),
])
def test_a_bad_hub_id_is_one_line_naming_the_option(hub, capsys, argv, expected):
    line = refused_by_train(argv, hub, capsys)
    assert expected.replace("{cache}", str(hub / "hf" / "hub")) in line, line


def test_a_safetensors_pipeline_id_passes_the_checks(hub):
    """The same checks accept org/tiny, which differs from org/pickled only by its transformer's safetensors
    file, and pin its revision to the commit main names: the refusals above are those of the files."""
    cfg = check_run(parse_config(["--model.name", "sd3", "--model.t5", "false", "--model.path", "org/tiny"]))
    assert cfg.model.revision == commit_of(3)
