"""Real perceptual spaces (dino, clip, pickscore) on tiny random checkpoints in their real layouts: shapes,
frozen weights, any image size, gradients that match finite differences, and path errors."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from _tiny_diffusers import tiny_clip_folder, tiny_dino_folder, tiny_open_clip_folder  # noqa: E402

from pec.config import PathsConfig  # noqa: E402
from pec.perceptual import build_space, check_spaces  # noqa: E402


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spaces")
    return PathsConfig(dino=str(tiny_dino_folder(tmp)), clip=str(tiny_open_clip_folder(tmp)),
                       pickscore=str(tiny_clip_folder(tmp)))


@pytest.mark.parametrize("name", ["dino", "clip", "pickscore"])
def test_space_shapes_frozen_and_differentiable(paths, name):
    space = build_space(name, device="cpu", paths=paths)
    assert not any(p.requires_grad for p in space.parameters()) and not space.train().training
    for shape in [(3, 3, 40, 56), (2, 1, 8, 8)]:  # any size; grey images are repeated to RGB
        feats = space(torch.rand(*shape))
        assert feats.shape == (shape[0], space.dim) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    x = torch.rand(2, 3, 36, 36, dtype=torch.float64).float().requires_grad_(True)
    weights = torch.randn(2, space.dim)
    (space(x) * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    direction, h = torch.randn_like(x), 1e-2
    with torch.no_grad():
        numeric = ((space(x + h * direction) - space(x - h * direction)) * weights).sum() / (2 * h)
    assert torch.allclose((x.grad * direction).sum(), numeric, rtol=5e-2, atol=1e-3)
    with pytest.raises(ValueError, match="images"):
        space(torch.rand(2, 4, 16, 16))


def test_distinct_images_get_distinct_features(paths):
    space = build_space("dino", device="cpu", paths=paths)
    a, b = torch.rand(1, 3, 28, 28), torch.rand(1, 3, 28, 28)
    fa, fa2, fb = space(torch.cat([a, a, b]))
    assert torch.allclose(fa, fa2, atol=1e-5) and not torch.allclose(fa, fb, atol=1e-3)


def test_path_checks_name_the_option(paths, tmp_path):
    check_spaces(["dino", "clip", "pickscore", "simclr"], paths)
    with pytest.raises(ValueError, match="--paths.dino is empty"):
        check_spaces(["dino"], PathsConfig())
    with pytest.raises(ValueError, match="--paths.dino.*holds a 'clip' model.*another architecture"):
        check_spaces(["dino"], PathsConfig(dino=paths.pickscore))
    with pytest.raises(ValueError, match="--paths.clip.*no open_clip_config.json"):
        check_spaces(["clip"], PathsConfig(clip=paths.dino))
    with pytest.raises(ValueError, match="--paths.clip is a checkpoint file.*--paths.clip_arch"):
        (tmp_path / "w.pt").write_bytes(b"")
        check_spaces(["clip"], PathsConfig(clip=str(tmp_path / "w.pt")))
    with pytest.raises(ValueError, match="unknown perceptual encoder 'dinov2'"):
        check_spaces(["dinov2"], paths)
