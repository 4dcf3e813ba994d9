"""Real-image rewards on tiny random checkpoints in their real layouts (PickScore's transformers CLIP
folder, open_clip folder and HPSv2-style checkpoint file, the LAION aesthetic head), the JPEG rules on
any size, weighted specs, path checks before loading, and the `http` reward against `pec.rewards.serve`
on 127.0.0.1, including a server that dies mid-run."""
import copy
import json
import math
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from _tiny_diffusers import TINY_OPEN_CLIP, tiny_clip_folder, tiny_open_clip_checkpoint, tiny_open_clip_folder  # noqa: E402,E501

from pec.config import PathsConfig  # noqa: E402
from pec.rewards import WeightedReward, build_reward, check_reward_spec, parse_reward_spec  # noqa: E402
from pec.rewards.aesthetic import AestheticHead, load_aesthetic_head  # noqa: E402
from pec.rewards.http import HttpReward, decode_png, encode_png  # noqa: E402
from pec.rewards.jpeg import jpeg_sizes_kb  # noqa: E402


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rewards")
    hps, arch = tiny_open_clip_checkpoint(tmp / "hps")
    clip_l = tiny_clip_folder(tmp, "clip_l", projection_dim=768)
    torch.manual_seed(5)
    torch.save(AestheticHead(768).state_dict(), tmp / "aesthetic.pth")
    return PathsConfig(pickscore=str(tiny_clip_folder(tmp)), clip=str(tiny_open_clip_folder(tmp)),
                       hpsv2=str(hps), hpsv2_arch=str(arch), aesthetic=str(tmp / "aesthetic.pth"),
                       aesthetic_clip=str(clip_l))


PROMPTS = ["a photo of a cat", "a red car", "a dog"]


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "hpsv2", "aesthetic"])
def test_model_rewards_score_batches_of_any_size(paths, name):
    reward = build_reward(name, device="cpu", paths=paths)
    images = torch.rand(3, 3, 48, 40)
    r = reward(images, PROMPTS)
    assert r.shape == (3,) and r.dtype == torch.float32 and not r.requires_grad and torch.isfinite(r).all()
    reward.batch_size = 2  # scoring in batches changes nothing
    assert torch.allclose(reward(images, PROMPTS), r, atol=1e-5)
    if name != "aesthetic":  # prompt-aligned rewards read the prompt
        assert not torch.allclose(reward(images, PROMPTS[::-1]), r)
    with pytest.raises(ValueError, match="prompts"):
        reward(images, PROMPTS[:2])


def test_pickscore_is_scaled_clip_similarity(paths):
    reward = build_reward("pickscore", device="cpu", paths=paths)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        sims = (reward.clip.image_features(images) * reward.clip.text_features(PROMPTS[:2])).sum(-1)
    assert torch.allclose(reward(images, PROMPTS[:2]), reward.clip.logit_scale * sims / 26, atol=1e-5)


def test_jpeg_rewards_on_any_resolution():
    flat, noise = torch.full((1, 3, 96, 64), 0.5), torch.rand(1, 3, 96, 64)
    images = torch.cat([flat, noise])
    sizes = jpeg_sizes_kb(images)
    compress = build_reward("jpeg")(images, ["x", "y"])
    incompress = build_reward("jpeg_incompressibility")(images, ["x", "y"])
    assert torch.allclose(compress, -sizes / 500) and torch.allclose(incompress, sizes / 500)
    assert compress[0] > compress[1]  # a flat image compresses better than noise
    assert build_reward("jpeg")(torch.rand(2, 1, 8, 8), ["x", "y"]).shape == (2,)


def test_weighted_spec(paths):
    assert parse_reward_spec("pickscore:1.0, jpeg:0.1") == [("pickscore", 1.0), ("jpeg", 0.1)]
    assert parse_reward_spec("jpeg") == [("jpeg", 1.0)]
    for bad, match in [("jpeg:x", "weight of 'jpeg' must be a number"), ("jpeg,jpeg", "twice"),
                       ("jpg:1", "unknown reward 'jpg'"), ("", "--reward"), ("jpeg:nan", "finite")]:
        with pytest.raises(ValueError, match=match):
            parse_reward_spec(bad)
    reward = build_reward("clipscore:0.5,jpeg:2.0", paths=paths)
    assert isinstance(reward, WeightedReward)
    images = torch.rand(3, 3, 32, 32)
    parts = reward.components(images, PROMPTS)
    assert torch.allclose(reward(images, PROMPTS), 0.5 * parts["clipscore"] + 2.0 * parts["jpeg"])


def test_checks_before_loading_name_the_option(paths, tmp_path):
    check_reward_spec("pickscore:1,clipscore:1,hpsv2:1,aesthetic:1,jpeg:0.1", paths)
    with pytest.raises(ValueError, match="--paths.pickscore is empty"):
        check_reward_spec("pickscore", PathsConfig())
    with pytest.raises(ValueError, match="--paths.pickscore.*not a folder"):
        check_reward_spec("pickscore", PathsConfig(pickscore=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="--paths.hpsv2_arch: 'ViT-Z-99' is not an open_clip architecture"):
        check_reward_spec("hpsv2", PathsConfig(hpsv2=paths.hpsv2, hpsv2_arch="ViT-Z-99"))
    with pytest.raises(ValueError, match="--paths.aesthetic.*not a file"):
        check_reward_spec("aesthetic", PathsConfig(aesthetic=str(tmp_path), aesthetic_clip=paths.aesthetic_clip))
    # Checkpoints of the wrong architecture: caught when the weights load, naming the option.
    wider = copy.deepcopy(TINY_OPEN_CLIP)
    wider["text_cfg"]["width"] = 48
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    with pytest.raises(ValueError, match="--paths.hpsv2.*does not fit the open_clip architecture"):
        build_reward("hpsv2", paths=PathsConfig(hpsv2=paths.hpsv2, hpsv2_arch=str(tmp_path / "wider.json")))
    with pytest.raises(ValueError, match="--paths.aesthetic reads 768-d embeddings but --paths.aesthetic_clip gives"):
        check_reward_spec("aesthetic", PathsConfig(aesthetic=paths.aesthetic, aesthetic_clip=paths.pickscore))
    with pytest.raises(ValueError, match="--paths.aesthetic.*not an aesthetic head for 16-d"):
        load_aesthetic_head(paths.aesthetic, 16)
    with pytest.raises(ValueError, match="--paths.reward_url.*does not answer"):
        check_reward_spec("http", PathsConfig(reward_url="http://127.0.0.1:9/"))


def test_png_round_trip():
    image = torch.rand(3, 12, 10)
    back = decode_png(encode_png(image))
    assert back.shape == image.shape and (back - image).abs().max() <= 0.5 / 255 + 1e-6
    grey = torch.rand(1, 5, 7)
    assert decode_png(encode_png(grey)).shape == (1, 5, 7)


def _start_server(name: str):
    process = subprocess.Popen([sys.executable, "-m", "pec.rewards.serve", name, "--port", "0", "--device", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 60
    line = ""
    while time.time() < deadline and not line.startswith("serving"):
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            raise RuntimeError("the reward server exited")
    return process, line.split(" on ")[1].strip()


def test_http_reward_against_serve_and_a_server_that_dies():
    process, url = _start_server("jpeg")
    try:
        paths = PathsConfig(reward_url=url)
        check_reward_spec("http", paths)
        reward = build_reward("http:1.0", paths=paths)
        reward.batch_size = 2  # three requests for five images
        images = torch.rand(5, 3, 24, 16)
        prompts = [f"p{i}" for i in range(5)]
        local = build_reward("jpeg")(images, prompts)
        assert torch.allclose(reward(images, prompts), local, atol=1e-6)
        process.terminate()
        process.wait(timeout=10)
        dead = HttpReward(url, timeout=2, retries=2, backoff=0.05)
        start = time.time()
        with pytest.raises(ConnectionError, match=r"--paths.reward_url\) did not answer after 3 tries"):
            dead(images, prompts)
        assert time.time() - start < 10
    finally:
        process.kill()
        process.wait(timeout=10)
    assert math.isfinite(float(local.sum()))
