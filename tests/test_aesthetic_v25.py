"""The reward `aesthetic_v25` (Aesthetic Predictor v2.5) on tiny random checkpoints in the released layouts: a
SigLIP folder (a SiglipVisionModel's, and a full SiglipModel's as google/siglip-so400m-patch14-384 ships) with
its SiglipImageProcessor config, and a head file with the released .pth's key names and dtype (bf16); its
path checks before loading; and the evaluation's mapping of it to the paper's Aesthetic column."""
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from _tiny_diffusers import tiny_clip_folder  # noqa: E402

from pec.config import PathsConfig  # noqa: E402
from pec.evaluate import PAPER_QUALITY, coverage_markdown, paper_coverage  # noqa: E402
from pec.rewards import build_reward, check_reward_spec  # noqa: E402
from pec.rewards.aesthetic import AestheticHead  # noqa: E402
from pec.rewards.aesthetic_v25 import load_siglip, load_v25_head  # noqa: E402

WIDTH, SIZE = 32, 32
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
VISION = dict(hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
              patch_size=8)
# The released aesthetic_predictor_v2_5.pth: an OrderedDict of bf16 tensors under these names (widths
# 1152 -> 1024 -> 128 -> 64 -> 16 -> 1 there; the input width is the tiny tower's here).
RELEASED_WIDTHS = (1024, 128, 64, 16, 1)


def released_head(dim: int, seed: int = 3) -> OrderedDict:
    """A random head state dict in the released file's format, written without the package's head class."""
    gen = torch.Generator().manual_seed(seed)
    state, widths = OrderedDict(), (dim,) + RELEASED_WIDTHS
    for i in range(len(RELEASED_WIDTHS)):
        state[f"scoring_head.{2 * i}.weight"] = (torch.randn(widths[i + 1], widths[i], generator=gen)
                                                 / widths[i] ** 0.5).bfloat16()
        state[f"scoring_head.{2 * i}.bias"] = torch.randn(widths[i + 1], generator=gen).bfloat16()
    return state


def save_processor(folder, mean=MEAN, std=STD):
    transformers.SiglipImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=list(mean),
                                      image_std=list(std)).save_pretrained(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aesthetic_v25")
    torch.manual_seed(0)
    tower = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)).eval()
    tower.save_pretrained(tmp / "siglip_vision")
    save_processor(tmp / "siglip_vision")
    full = transformers.SiglipModel(transformers.SiglipConfig(
        vision_config=VISION, text_config=dict(hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=1,
                                               num_attention_heads=4, vocab_size=64, max_position_embeddings=16)))
    full.save_pretrained(tmp / "siglip_full")
    save_processor(tmp / "siglip_full")
    torch.save(released_head(WIDTH), tmp / "head.pth")
    torch.save(released_head(16), tmp / "head16.pth")
    torch.save(AestheticHead(WIDTH).state_dict(), tmp / "laion.pth")
    (tmp / "junk.pth").write_bytes(b"not a checkpoint")
    return dict(tmp=tmp, tower=tower, full=full,
                paths=PathsConfig(aesthetic_v25=str(tmp / "head.pth"), aesthetic_v25_siglip=str(tmp / "siglip_vision")))


def reference_scores(tower, state, images):
    """The original package's AestheticPredictorV2_5Model.forward on already-sized images: the pooled output,
    divided by its norm, through Linear layers (dropout is off in eval)."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        x = tower(pixel_values=(images - mean) / std).pooler_output
        x = x / x.norm(dim=-1, keepdim=True)
        for i in range(len(RELEASED_WIDTHS)):
            x = F.linear(x, state[f"scoring_head.{2 * i}.weight"].float(), state[f"scoring_head.{2 * i}.bias"].float())
    return x.squeeze(-1)


def test_scores_match_the_original_formula_in_any_batch(world):
    reward = build_reward("aesthetic_v25", device="cpu", paths=world["paths"])
    images = torch.rand(5, 3, SIZE, SIZE)
    prompts = ["a"] * 5
    r = reward(images, prompts)
    assert r.shape == (5,) and r.dtype == torch.float32 and not r.requires_grad and torch.isfinite(r).all()
    assert r.std() > 0  # different images, different scores
    expected = reference_scores(world["tower"], torch.load(world["tmp"] / "head.pth", weights_only=True), images)
    assert torch.allclose(r, expected, atol=1e-5)
    reward.batch_size = 2  # batching changes nothing, nor do the prompts
    assert torch.allclose(reward(images, ["b"] * 5), r, atol=1e-5)
    other = reward(torch.rand(3, 1, 48, 40), ["a"] * 3)  # grey, any size: resized to the processor's size
    assert other.shape == (3,) and torch.isfinite(other).all()


def test_preprocessing_follows_the_folder_processor(world):
    """Against transformers' SiglipImageProcessor on a smooth non-square image: resize to height x width with
    no crop, then the folder's mean / std (PIL's bicubic vs torch's antialiased one: close, not equal)."""
    from PIL import Image

    torch.manual_seed(4)
    image = F.interpolate(torch.rand(1, 3, 6, 5), size=(72, 60), mode="bilinear", align_corners=False)
    pil = Image.fromarray((image[0].permute(1, 2, 0) * 255).round().byte().numpy())
    theirs = transformers.SiglipImageProcessor.from_pretrained(
        str(world["tmp"] / "siglip_vision")).__call__(images=pil, return_tensors="pt").pixel_values
    ours = load_siglip(world["paths"].aesthetic_v25_siglip).preprocess(image)
    assert ours.shape == theirs.shape == (1, 3, SIZE, SIZE)
    assert (ours - theirs).abs().mean() < 0.03
    centre_crop = F.interpolate(image[:, :, 6:66], size=(SIZE, SIZE), mode="bicubic", antialias=True)
    assert (ours - (centre_crop - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
            ).abs().mean() > 0.03  # the comparison can tell a crop from a resize


def test_a_full_siglip_folder_loads_its_vision_tower(world):
    """google/siglip-so400m-patch14-384 is a SiglipModel folder (vision and text): its tower's weights load."""
    encoder = load_siglip(str(world["tmp"] / "siglip_full"))
    loaded = {k.removeprefix("vision_model."): v for k, v in encoder.model.state_dict().items()}
    saved = {k.removeprefix("vision_model."): v for k, v in world["full"].state_dict().items()
             if k.startswith("vision_model.")}
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    paths = PathsConfig(aesthetic_v25=world["paths"].aesthetic_v25,
                        aesthetic_v25_siglip=str(world["tmp"] / "siglip_full"))
    assert torch.isfinite(build_reward("aesthetic_v25", paths=paths)(torch.rand(2, 3, 40, 40), ["a", "b"])).all()


def test_checks_before_loading_name_the_option(world, tmp_path):
    paths, tmp = world["paths"], world["tmp"]
    check_reward_spec("aesthetic_v25:1,jpeg:0.1", paths)

    def fails(match, **kw):
        with pytest.raises(ValueError, match=match):
            check_reward_spec("aesthetic_v25", PathsConfig(**{**vars(paths), **kw}))

    fails("--paths.aesthetic_v25 is empty", aesthetic_v25=None)
    fails("--paths.aesthetic_v25: .* is not a file", aesthetic_v25=str(tmp_path / "missing.pth"))
    fails("--paths.aesthetic_v25: .* does not load as a state dict", aesthetic_v25=str(tmp / "junk.pth"))
    fails("--paths.aesthetic_v25 is not an Aesthetic Predictor v2.5 head", aesthetic_v25=str(tmp / "laion.pth"))
    fails("--paths.aesthetic_v25 reads 16-d features but --paths.aesthetic_v25_siglip gives 32-d",
          aesthetic_v25=str(tmp / "head16.pth"))
    fails("--paths.aesthetic_v25_siglip is empty", aesthetic_v25_siglip=None)
    fails("--paths.aesthetic_v25_siglip: .* is not a folder", aesthetic_v25_siglip=str(tmp_path / "missing"))
    fails("--paths.aesthetic_v25_siglip: .* holds a 'clip' model", aesthetic_v25_siglip=str(
        tiny_clip_folder(tmp_path, "clip")))
    bare = tmp_path / "bare"
    world["tower"].save_pretrained(bare)
    fails("--paths.aesthetic_v25_siglip: .* has no preprocessor_config.json", aesthetic_v25_siglip=str(bare))
    (bare / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": SIZE}}))
    fails("--paths.aesthetic_v25_siglip: .*preprocessor_config.json must give size", aesthetic_v25_siglip=str(bare))
    with pytest.raises(ValueError, match="--paths.aesthetic_v25: .* is not a v2.5 head for 16-d"):
        load_v25_head(paths.aesthetic_v25, 16)
    # A config that asks for more layers than the weights hold: caught when loading, not left random.
    deeper = tmp_path / "deeper"
    world["tower"].save_pretrained(deeper)
    save_processor(deeper)
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    check_reward_spec("aesthetic_v25", PathsConfig(aesthetic_v25=paths.aesthetic_v25, aesthetic_v25_siglip=str(deeper)))
    with pytest.raises(ValueError, match="--paths.aesthetic_v25_siglip: .* lacks or mismatches"):
        load_siglip(str(deeper))


def test_the_paper_aesthetic_column_says_which_predictor_filled_it():
    assert PAPER_QUALITY["Aesthetic"] == "aesthetic_v25"
    v25 = paper_coverage(["pickscore", "aesthetic_v25"], [])
    assert v25["quality"]["present"]["Aesthetic"] == "aesthetic_v25" and "aesthetic_v25" not in v25["extra"]
    assert "Aesthetic = aesthetic_v25 (Aesthetic Predictor v2.5" in coverage_markdown(v25, "")
    laion = paper_coverage(["aesthetic"], [])  # the LAION head stands in, and the table says so
    assert laion["quality"]["present"]["Aesthetic"] == "aesthetic"
    assert "Aesthetic = aesthetic (LAION aesthetic v2 (CLIP-L/14 MLP), not the paper's Aesthetic Predictor v2.5)" in \
        coverage_markdown(laion, "")
    both = paper_coverage(["aesthetic", "aesthetic_v25"], [])
    assert both["quality"]["present"]["Aesthetic"] == "aesthetic_v25"
    assert both["extra"]["aesthetic"].startswith("LAION aesthetic v2")
    neither = paper_coverage(["pickscore"], [])["quality"]["missing"]["Aesthetic"]
    assert "--eval.rewards aesthetic_v25" in neither and "or aesthetic, LAION aesthetic v2" in neither


@pytest.mark.gpu
def test_bf16_tower_on_the_gpu_scores_as_float32_on_the_cpu(world):
    images = torch.rand(6, 3, 48, 48)
    cpu = build_reward("aesthetic_v25", device="cpu", paths=world["paths"])(images, ["a"] * 6)
    gpu_reward = build_reward("aesthetic_v25", device="cuda", paths=world["paths"])
    assert next(gpu_reward.encoder.model.parameters()).dtype == torch.bfloat16
    assert next(gpu_reward.head.parameters()).dtype == torch.float32
    gpu = gpu_reward(images.cuda(), ["a"] * 6)
    assert gpu.dtype == torch.float32 and torch.allclose(gpu.cpu(), cpu, atol=0.05 * cpu.abs().max().item() + 0.02)
