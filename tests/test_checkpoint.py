"""pec.checkpoint on its own (issue 17): weights-only files whose RNG states restore exactly, nothing but
tensors and plain values written, rotation that never deletes the new checkpoint, entries that are not
regular files skipped without blocking, and the converter of format-2 (full pickle) checkpoints."""
import os
import random

import numpy as np
import pytest
import torch

from _checkpoints import deadline, rewrite_as_format2
from pec.checkpoint import (FORMAT, CHECKPOINT_DIR, MILESTONE_DIR, NoCheckpointError, checkpoint_at,
                            load_checkpoint, main, read_checkpoint, rng_state, save_checkpoint, set_rng_state)


def _save(run, step, **kwargs):
    return save_checkpoint(run, step=step, model_state={"w": torch.full((3,), float(step))},
                           optimizer_state={"state": {}, "param_groups": []}, config={"seed": 0}, **kwargs)


def _draws():
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(2).tolist()


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    np.random.randn()  # a cached gaussian in numpy's state, too
    path = _save(tmp_path, 1)
    expected = _draws()
    torch.load(path, weights_only=True)  # loads without an allow-list
    payload = read_checkpoint(path)
    assert payload["format"] == FORMAT
    set_rng_state(payload["rng"])
    assert _draws() == expected


def test_a_state_that_a_weights_only_load_cannot_read_is_never_written(tmp_path):
    with pytest.raises(TypeError, match=r"extra\.scale \(numpy\.float64\)"):
        _save(tmp_path, 1, extra={"scale": np.float64(1.0)})
    with pytest.raises(TypeError, match=r"rng\.numpy \(builtins\.object\)"):
        _save(tmp_path, 1, rng={**rng_state(), "numpy": object()})
    assert not (tmp_path / CHECKPOINT_DIR).exists() or not any((tmp_path / CHECKPOINT_DIR).iterdir())


def test_rotation_keeps_the_new_checkpoint_beside_a_stray_higher_one(tmp_path):
    folder = tmp_path / CHECKPOINT_DIR
    folder.mkdir()
    (folder / "step-00000099.pt").write_bytes(b"torn")
    (folder / "step-00000000.pt").mkdir()  # a folder named like a checkpoint is never unlinked
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=1)
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000000.pt", "step-00000003.pt", "step-00000099.pt"]
    assert load_checkpoint(tmp_path)["step"] == 3


def test_entries_that_are_not_regular_files_are_skipped_saying_what_they_are(tmp_path):
    _save(tmp_path, 1)
    folder = tmp_path / CHECKPOINT_DIR
    os.mkfifo(folder / "step-00000002.pt")
    (folder / "step-00000003.pt").mkdir()
    (folder / "step-00000004.pt").symlink_to(tmp_path / "nowhere")
    (folder / "step-00000005.pt").symlink_to(folder / "step-00000003.pt")
    skipped = {}
    with deadline(20):
        payload = load_checkpoint(tmp_path, on_skip=lambda path, reason: skipped.__setitem__(path.name, reason))
        with pytest.raises(ValueError, match=r"is not a regular file \(a FIFO\)"):
            checkpoint_at(tmp_path, 2)
    assert payload["step"] == 1
    assert skipped == {"step-00000002.pt": "is not a regular file (a FIFO)",
                       "step-00000003.pt": "is not a regular file (a directory)",
                       "step-00000004.pt": "cannot be read (No such file or directory)",
                       "step-00000005.pt": "is not a regular file (a directory)"}


def test_the_converter_rewrites_a_trusted_format2_run_and_keeps_milestones_linked(tmp_path, capsys):
    _save(tmp_path, 1)
    _save(tmp_path, 2, milestone=True)
    rotation, milestone = tmp_path / CHECKPOINT_DIR / "step-00000002.pt", tmp_path / MILESTONE_DIR / "step-00000002.pt"
    legacy = {p: rewrite_as_format2(p) for p in (tmp_path / CHECKPOINT_DIR).iterdir()}  # in place: the
    assert os.path.samefile(rotation, milestone)  # milestone, a hard link, is format 2 too
    with pytest.raises(NoCheckpointError, match=r"If you trust these files, convert them with: python -m "
                                                rf"pec\.checkpoint convert {tmp_path} --trusted$"):
        load_checkpoint(tmp_path)

    main(["convert", str(tmp_path), "--trusted"])
    out = capsys.readouterr().out
    assert out.count("converted (format 2 -> 3)") == 2 and "converted (linked to step-00000002.pt)" in out
    assert os.path.samefile(rotation, milestone)
    for path, old in legacy.items():
        new = read_checkpoint(path)
        assert torch.equal(new["model"]["w"], old["model"]["w"]) and new["config"] == old["config"]
        set_rng_state(new["rng"])
        after_new = _draws()
        random.setstate(old["rng"]["python"]), np.random.set_state(old["rng"]["numpy"])
        torch.set_rng_state(old["rng"]["torch"])
        assert _draws() == after_new
    main(["convert", str(tmp_path), "--trusted"])  # a second pass leaves every file as it is
    assert capsys.readouterr().out.count(f": already format {FORMAT}\n") == 3
    assert os.path.samefile(rotation, milestone)
