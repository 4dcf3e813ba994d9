"""Videos (B, F, C, H, W) through the pieces a video model's run uses, each checked on its own: the SDE kernels
on 5-D latents, run safety's masks, the frames `pec.video` picks, the perceptual spaces' pooling (`VideoSpace`:
mean / concat, differentiable), the rewards on frames (`VideoReward`, `temporal_smoothness`), the `http`
reward's "videos" requests against `pec.rewards.serve` over loopback (the pixel limit over every frame), and
the sample grids (frame strips plus a GIF; no GIF writer is one warning)."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pec.logging_utils import STRIP_FRAMES, save_image_grid
from pec.perceptual import VideoSpace, build_space
from pec.rewards import REWARDS, build_reward, on_videos
from pec.rewards.http import HttpReward, request
from pec.rewards.rules import ContrastReward
from pec.rewards.serve import Limits, start_server
from pec.run_safety import finite_samples, zero_invalid
from pec.video import frame_indices, spread_frames
from pec_kernels import guided_sde_step


@pytest.mark.parametrize("kind", ["flow", "cps", "dance"])
def test_sde_kernels_take_video_latents(kind):
    """A step on (B, C, F, h, w) latents is the step on the same numbers flattened to (B, D): the sample, its
    mean, the log-prob of a given sample and the KL to a reference, whatever the rank."""
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 2, 3, 5)  # B, C, F, h, w
    x, vu, vc, v_ref, noise, guidance = (torch.randn(shape, generator=g) for _ in range(6))
    sigma, sigma_next = torch.full((3,), 0.8), torch.full((3,), 0.6)

    def step(flat: bool, **extra):
        t = (lambda a: a.flatten(1)) if flat else (lambda a: a)
        return guided_sde_step(t(x), t(vu), t(vc), 2.0, sigma, sigma_next, guidance=t(guidance), guidance_weight=0.5,
                               kind=kind, eta=0.7, v_ref=t(v_ref), return_mean=True,
                               **{k: t(v) for k, v in extra.items()})

    for extra in ({"noise": noise}, {"prev_sample": noise}):
        video, flat = step(False, **extra), step(True, **extra)
        assert video.prev_sample.shape == shape and video.mean.shape == shape
        assert torch.equal(video.prev_sample.flatten(1), flat.prev_sample)
        assert torch.equal(video.mean.flatten(1), flat.mean)
        assert torch.equal(video.log_prob, flat.log_prob) and torch.equal(video.kl, flat.kl)


def test_run_safety_masks_a_video_by_any_frame():
    videos = torch.rand(4, 5, 3, 8, 8)
    videos[2, 4, 1, 3, 3] = float("nan")  # one pixel of the last frame of video 2
    finite = finite_samples(torch.zeros(4), videos)
    assert finite.tolist() == [True, True, False, True]
    latents = torch.randn(3, 4, 16, 2, 4, 4)  # (T + 1, B, C, F, h, w)
    latents[1, 2, 5, 1] = float("inf")
    zeroed = zero_invalid(latents, finite, dim=1)
    assert torch.equal(zeroed[:, 2], torch.zeros_like(latents[:, 2]))
    assert torch.equal(zeroed[:, [0, 1, 3]], latents[:, [0, 1, 3]])


def test_frames_spread_over_the_clip():
    assert frame_indices(81, 4) == [0, 27, 53, 80] and frame_indices(5, 4) == [0, 1, 3, 4]
    assert frame_indices(5, 1) == [2] and frame_indices(5, 0) == frame_indices(5, 9) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="count must be an int >= 0"):
        frame_indices(5, -1)
    videos = torch.rand(2, 5, 3, 4, 4)
    assert torch.equal(spread_frames(videos, 3), videos[:, [0, 2, 4]])
    with pytest.raises(ValueError, match=r"videos must have shape \(B, F, C, H, W\)"):
        spread_frames(videos[0], 3)


class PixelSpace(torch.nn.Module):
    """A stand-in image space: a fixed linear map of the pixels (B, C, H, W) -> (B, 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 6)

    def forward(self, images):
        assert images.dim() == 4  # an image space sees frames only
        return self.proj(images.flatten(1))


def test_video_space_pools_frames_differentiably():
    torch.manual_seed(0)
    space, videos = PixelSpace(), torch.rand(2, 5, 3, 4, 4)
    frames = [0, 1, 3, 4]
    per_frame = torch.stack([space(videos[:, f]) for f in frames], dim=1)  # (B, 4, 6)
    concat, mean = VideoSpace(space, "concat", 4), VideoSpace(space, "mean", 4)
    assert torch.allclose(concat(videos), per_frame.flatten(1), atol=1e-6) and concat(videos).shape == (2, 24)
    assert torch.allclose(mean(videos), per_frame.mean(dim=1), atol=1e-6) and mean(videos).shape == (2, 6)
    assert VideoSpace(space, "concat", 0)(videos).shape == (2, 30)  # every frame
    # Motion counts with concat only: the clip played backwards has the same mean feature.
    backwards = videos.flip(1)
    assert torch.allclose(mean(backwards), mean(videos), atol=1e-6)
    assert not torch.allclose(concat(backwards), concat(videos), atol=1e-3)
    # Differentiable (PCGS's guided form backpropagates through it): into the chosen frames only.
    clip = videos.clone().requires_grad_(True)
    concat(clip).square().sum().backward()
    touched = clip.grad.flatten(2).abs().sum(dim=2) > 0
    assert touched.tolist() == [[True, True, False, True, True]] * 2
    with pytest.raises(ValueError, match="--perceptual.video_pool must be one of"):
        VideoSpace(space, "max", 4)


def test_build_space_wraps_an_image_space_for_videos(world):
    image = build_space("simclr", directory=world)
    video = build_space("simclr", directory=world, video_pool="concat", video_frames=2)
    clips = torch.rand(3, 5, 1, 8, 8)
    assert isinstance(video, VideoSpace) and not isinstance(image, VideoSpace)
    assert torch.allclose(video(clips), torch.cat([image(clips[:, 0]), image(clips[:, 4])], dim=1))


def test_rewards_take_videos_on_their_frames():
    videos, prompts = torch.rand(3, 5, 3, 8, 8), ["a", "b", "c"]
    contrast = build_reward("contrast", video_frames=2)
    expected = (ContrastReward()(videos[:, 0], prompts) + ContrastReward()(videos[:, 4], prompts)) / 2
    assert torch.allclose(contrast(videos, prompts), expected)
    # A reward that takes videos gets the chosen frames as the clip; weights apply per term.
    both = build_reward("contrast:1.0,temporal_smoothness:0.5", video_frames=0)
    steps = (videos[:, 1:] - videos[:, :-1]).abs().flatten(1).mean(dim=1)
    frames_mean = torch.stack([ContrastReward()(videos[:, f], prompts) for f in range(5)]).mean(dim=0)
    assert torch.allclose(both(videos, prompts), frames_mean + 0.5 * (1 - steps))
    assert REWARDS.get("temporal_smoothness").needs_video and both.needs_video and not contrast.needs_video
    with pytest.raises(ValueError, match="at least 2 frames"):
        build_reward("temporal_smoothness", video_frames=1)(videos, prompts)


def _png(frame: torch.Tensor) -> str:
    buffer = io.BytesIO()
    Image.fromarray((frame.permute(1, 2, 0) * 255).round().byte().numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _post(url: str, payload: dict):
    answer = request(url, body=json.dumps(payload).encode())
    return answer.status, json.loads(answer.body)


def test_video_requests_through_the_http_reward_and_the_server():
    """The client sends each clip's frames as "videos"; the server scores a video reward on them and an image
    reward as the mean over every frame sent, as the same rewards do in-process; its pixel limit counts every
    frame; a video-only server says so in its health check and refuses "images"."""
    # Frames quantised to 8 bits, as PNGs carry them.
    videos, prompts = (torch.rand(3, 5, 3, 8, 8) * 255).round() / 255, ["a", "b", "c"]
    limits = Limits(max_pixels=2 * 5 * 64)  # two videos of five 8x8 frames
    with start_server(build_reward("contrast"), "contrast", limits=limits) as image_server, \
            start_server(build_reward("temporal_smoothness"), "temporal_smoothness", limits=limits) as video_server:
        for server, name in ((image_server, "contrast"), (video_server, "temporal_smoothness")):
            client = on_videos(HttpReward(server.url, batch_size=10), 0)  # 10 frames a request: 2 videos
            local = build_reward(name, video_frames=0)
            assert torch.allclose(client(videos, prompts), local(videos, prompts), atol=1e-6)
        health = json.loads(request(video_server.url).body)
        assert health == {"reward": "temporal_smoothness", "video": True}
        assert json.loads(request(image_server.url).body) == {"reward": "contrast"}
        clips = [[_png(f) for f in clip] for clip in videos]
        status, answer = _post(image_server.url, {"prompts": prompts, "videos": clips})
        assert status == 400 and answer["error"].startswith("the videos hold 960 pixels, over the limit of 640")
        status, answer = _post(video_server.url, {"prompts": ["a"], "images": [clips[0][0]]})
        assert status == 400 and 'scores videos only: send "videos"' in answer["error"]
        bad = [({"prompts": ["a", "b"], "videos": [clips[0], clips[1][:4]]}, '"videos"[1] has 4 frames of 8x8 RGB'),
               ({"prompts": ["a"], "videos": [[]]}, '"videos"[0] must be a non-empty list of its frames'),
               ({"prompts": ["a"], "videos": [[clips[0][0], "@@"]]}, '"videos"[0][1] is not base64'),
               ({"prompts": ["a"], "videos": [[clips[0][0], base64.b64encode(b"GIF89a").decode()]]},
                '"videos"[0][1] is not a PNG'),
               ({"prompts": ["a"], "videos": [clips[0]], "images": [clips[0][0]]}, 'give "images" or "videos"')]
        for payload, reason in bad:
            status, answer = _post(image_server.url, payload)
            assert status == 400 and reason in answer["error"] and "\n" not in answer["error"], answer


def test_video_grids_are_frame_strips_and_a_gif(tmp_path):
    videos = torch.rand(4, 5, 3, 6, 6)
    save_image_grid(videos, tmp_path / "grid.png", nrow=2, scale=1)
    strips = Image.open(tmp_path / "grid.png")
    assert strips.size == (STRIP_FRAMES * 7 + 1, 4 * 7 + 1)  # one row per video, 1-pixel borders
    gif = Image.open(tmp_path / "grid.gif")
    assert gif.n_frames == 5 and gif.size == (2 * 7 + 1, 2 * 7 + 1) and gif.info["loop"] == 0
    # A strip shows frames 0, 1, 3, 4 of its video, in order.
    row = torch.tensor(np.array(strips)).permute(2, 0, 1).float() / 255
    for col, frame in enumerate(frame_indices(5, STRIP_FRAMES)):
        cell = row[:, 8:14, 1 + 7 * col:7 + 7 * col]  # the second video's row
        assert torch.allclose(cell, videos[1, frame], atol=1 / 255)


def test_no_gif_writer_is_one_warning_and_the_strips_stay(tmp_path, monkeypatch, capsys):
    Image.init()  # Pillow registers its writers on first use
    for writers in (Image.SAVE, Image.SAVE_ALL):  # a Pillow without its GIF writer
        monkeypatch.delitem(writers, "GIF")
    save_image_grid(torch.rand(2, 5, 3, 6, 6), tmp_path / "grid.png", nrow=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "grid.gif: not written" in err[0]
    assert (tmp_path / "grid.png").is_file() and not (tmp_path / "grid.gif").exists()
