"""A Hugging Face hub cache built by hand, in the layout huggingface_hub reads (its cache-system guide):

    HF_HOME/hub/models--ORG--NAME/blobs/<sha256>              the files' contents
    HF_HOME/hub/models--ORG--NAME/snapshots/<commit>/<path>   relative symlinks to the blobs
    HF_HOME/hub/models--ORG--NAME/refs/<branch or tag>        the commit it names

`cache_repo` puts a folder there as one commit; `scan_cache_dir` (huggingface_hub's own reader) must list it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Every file under `folder` as the snapshot `commit` (40 hex digits) of `repo_id` in the hub cache `cache`
    (HF_HOME/hub), with `refs` naming it; returns the snapshot folder."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def commit_of(n: int) -> str:
    """A made-up commit hash (40 hex digits), distinct for each n."""
    return hashlib.sha1(str(n).encode()).hexdigest()
