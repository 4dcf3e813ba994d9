"""Model folders and weight files named by a local path or a Hugging Face hub id: `resolve_path`.

Every option that names a model folder or a weight file (`--model.path` and the weights of `--paths.*`)
goes through `resolve_path` (`--model.path`: `resolve_model_path`), in the config-only checks and in the
loaders alike:

- a path that exists on this machine is used as it is: the fast path, where no hub code runs;
- otherwise a hub id is looked up in huggingface_hub's cache (`HF_HOME`, or `HF_HUB_CACHE`) and fetched
  into it when the hub is reachable and `HF_HUB_OFFLINE` is not set: `ORG/NAME` names a repository (a
  folder), `ORG/NAME/FILE` one file in it. The revision (a branch, a tag or a commit; empty = main) of
  `--model.path` is `--model.revision`; a `--paths.*` id takes it after a colon, `ORG/NAME:REVISION` (`@`
  already names a run's milestone, RUN@STEP). Both variables are read at each call.
- a run records the commit each id resolved to (`--model.revision`; `pin_revision` for `--paths.*`), so
  that its resume and `pec.evaluate` load the same snapshot.

From the hub pec fetches and loads configuration files, tokenizer files and safetensors weights only:
never pickled weights (`.bin`, `.pt`: unpickling can run code) and never code. A diffusers folder's
components must come from diffusers or transformers (`pec.models.diffusers_model.check_pipeline_folder`),
and every loader passes `trust_remote_code=False` (`load_options`). A single file named `ORG/NAME/FILE` (an
aesthetic head, an HPSv2 checkpoint) is fetched as named: pec reads such pickles with
`torch.load(weights_only=True)`, which builds tensors only.

A hub id that cannot be resolved is one ValueError naming the option; offline (or without a network) and
not in the cache, it says how to fetch it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

# What pec fetches of a hub folder, by its layout ("pipeline": model_index.json, then these files of each
# component folder it names): configs (*.json, tokenizer.json and vocab.json among them), tokenizer files
# (merges.txt, vocab.txt; SentencePiece's *.model) and safetensors weights. A layout's weights: the files of
# which a snapshot must hold one (for a pipeline, each component folder with a config.json: the models).
TOKENIZER_FILES = ("*.txt", "*.model")
FOLDER_FILES = ("*.json", "*.safetensors", *TOKENIZER_FILES)
LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pipeline": (("model_index.json",), ()),
    "model": (("*.json", "model.safetensors", "model-*-of-*.safetensors", *TOKENIZER_FILES),
              ("model.safetensors", "model.safetensors.index.json")),
    "processor": (("*.json", *TOKENIZER_FILES), ()),
    "open_clip": (("open_clip_config.json", "open_clip_model.safetensors"), ("open_clip_model.safetensors",)),
    "file": ((), ()),
}
FILE_LAYOUTS = ("open_clip", "file")  # the layouts whose option may name one file: ORG/NAME/FILE
_NAME = r"[A-Za-z0-9_](?:[\w.-]*[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?P<file>(?:/[^:/]+)+)?(?::(?P<revision>[^:\s]+))?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")  # a revision that is a commit names one snapshot for good


@dataclass(frozen=True)
class HubRef:
    """A hub id taken apart: the repository, the file in it (None: the repository's folder), the revision."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"/{self.filename}" if self.filename else "")


def hub_cache() -> Path:
    """The hub cache folder, as huggingface_hub finds it (HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub), read from the environment now rather than when huggingface_hub was imported."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set to a true value, as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def parse_hub_id(value: str) -> HubRef | None:
    """`ORG/NAME[/FILE][:REVISION]` as a `HubRef`; None for anything else (a local path: absolute, `./`, `~`,
    a single name). Repository names follow the hub's rules: letters, digits, `_`, `-` and `.`, starting and
    ending with a letter, digit or `_`, without `--` or `..`."""
    match = HUB_ID.match(value)
    if match is None or "--" in match["repo"] or ".." in match["repo"] or len(match["repo"]) > 96:
        return None
    file = match["file"]
    if file and any(part in (".", "..") for part in file.split("/")[1:]):
        return None
    return HubRef(match["repo"], file[1:] if file else None, match["revision"])


def in_hub_cache(path: str | Path) -> bool:
    """Whether `path` is a snapshot folder of huggingface_hub's cache (…/models--ORG--NAME/snapshots/COMMIT)
    or a file in one: what came from the hub, which pec loads as safetensors only (`load_options`)."""
    parts = Path(path).parts
    return any(parts[i].startswith("models--") and parts[i + 1] == "snapshots" for i in range(len(parts) - 2))


def load_options(folder: str | Path, weights: bool = True) -> dict:
    """The keyword arguments every `from_pretrained` of pec's loaders passes for `folder`: local files only
    (it is resolved already), never remote code, and where it loads `weights` from a folder of the hub cache,
    safetensors only."""
    return {"local_files_only": True, "trust_remote_code": False,
            **({"use_safetensors": True} if weights and in_hub_cache(folder) else {})}


def resolve_model_path(path: str | Path | None, revision: str | None = None, *, layout: str = "pipeline") -> Path:
    """The local folder of the model that `--model.path` `path` names at `--model.revision` `revision`: `path`
    itself where it exists on this machine (no hub code runs), else the snapshot of the hub id `path` in
    huggingface_hub's cache (fetched into it unless HF_HUB_OFFLINE is set). The one place pec resolves a
    model's folder: its checks and loaders call it, and so may any command that records or reloads a base
    model (the revision a run recorded is a commit: `pec.models.check_model_config` pins it).

    Args:
        path: a local folder or a hub id ORG/NAME.
        revision: a branch, tag or commit of a hub id; None = main. Refused for a local path.
        layout: "pipeline" (a diffusers folder: sd3, flux, flux2, qwen_image, wan) or "model" (the embedded
            model's folder: config.json + model.safetensors).

    Raises:
        ValueError: one line naming --model.path or --model.revision (`resolve_path`); for an empty `path` too.
    """
    folder = resolve_path(path, "--model.path", layout, revision=revision, revision_option="--model.revision")
    if folder is None:
        raise ValueError("--model.path is empty: give a local model folder or a hub id ORG/NAME")
    return folder


def pin_revision(value: str | None) -> str | None:
    """A `--paths.*` hub id `ORG/NAME[/FILE][:REVISION]` with its revision (main where it names none) replaced by
    the commit that revision names in huggingface_hub's cache, where `resolve_path` has just found or fetched
    it: what a run's config.yaml records, so that its resume and `pec.evaluate` load the same snapshot. Any
    other value (a local path, an id pinned already or not in the cache) comes back unchanged; no hub call."""
    ref = parse_hub_id(str(value)) if is_hub_id(value) else None
    if ref is None or COMMIT.match(ref.revision or ""):
        return value
    refs = _repo_folder(hub_cache(), ref.repo_id) / "refs" / (ref.revision or "main")
    return f"{ref}:{refs.read_text().strip()}" if refs.is_file() else value


def is_hub_id(value: str | Path | None) -> bool:
    """Whether `resolve_path` takes `value` for a hub id: no such path on this machine, and it reads as one."""
    return bool(value) and not Path(str(value)).expanduser().exists() and parse_hub_id(str(value)) is not None


def resolve_path(value: str | Path | None, option: str, layout: str, *, revision: str | None = None,
                 revision_option: str | None = None) -> Path | None:
    """The local path of a model folder or weight file named by `value`: a path on this machine, or a hub id
    resolved through huggingface_hub's cache (module docstring). None for an empty `value`, for the caller
    to refuse in its own words.

    Args:
        value: the option's value.
        option: the option, named in every error (e.g. "--paths.dino").
        layout: what the folder holds, which decides what is fetched: "pipeline" (a diffusers pipeline),
            "model" (a transformers model: config.json + model.safetensors), "processor" (configs and
            tokenizer files only), "open_clip" (an hf-hub-style open_clip folder, or ORG/NAME/FILE: a
            checkpoint file) or "file" (ORG/NAME/FILE only).
        revision: the revision of a hub id from its own option (`--model.revision`); None = the id's
            `:REVISION`, else main.
        revision_option: that option's name; given, the id may not carry `:REVISION` itself.

    Raises:
        ValueError: naming `option` (or `revision_option`): a revision for a local path, an id of the wrong
            kind, a repository, revision or file the hub (or, offline, the cache) does not have, a hub folder
            without safetensors weights.
        OSError: the hub answered with another error (e.g. 5xx), or the cache could not be written.
    """
    if value is None or str(value) == "":
        if revision:
            raise ValueError(f"{revision_option or option} {revision!r} needs {option} to name a hub id ORG/NAME")
        return None
    text = str(value)
    local = Path(text).expanduser()
    ref = None if local.exists() else parse_hub_id(text)
    if ref is None:
        if revision:
            raise ValueError(f"{revision_option} {revision!r} applies to a hub id, and {option} {text} is a local "
                             f"path: give the id (ORG/NAME) or leave {revision_option} empty")
        return local
    if ref.revision and revision_option:
        raise ValueError(f"{option} {text}: give its revision with {revision_option} {ref.revision}, not after ':'")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {sorted(LAYOUTS)}")
    if ref.filename and layout not in FILE_LAYOUTS:
        raise ValueError(f"{option} {text}: a hub id of a folder names a repository, ORG/NAME (revision after "
                         f"':'{' or in ' + revision_option if revision_option else ''}), not a path inside it")
    if not ref.filename and layout == "file":
        raise ValueError(f"{option} {text}: this option takes a file; name it in the repository, ORG/NAME/FILE")
    if revision:
        ref = HubRef(ref.repo_id, ref.filename, revision)
    return _fetch(ref, option, layout, revision_option)


def _fetch(ref: HubRef, option: str, layout: str, revision_option: str | None) -> Path:
    """`ref` from the cache (offline) or the hub, as `resolve_path` describes; errors in one line."""
    import huggingface_hub
    from huggingface_hub import errors

    cache, offline = hub_cache(), hub_offline()
    why_local = "HF_HUB_OFFLINE is set" if offline else None
    try:
        if not offline:
            # One question to the hub first, which fails at once where it cannot be reached (huggingface_hub's
            # downloads retry a lost connection for half a minute): unreachable, the cache alone answers. The
            # fetches below name the revision itself, not the commit it answers, so that the cache records
            # the branch or tag (refs/) for a later run offline.
            try:
                huggingface_hub.HfApi().model_info(ref.repo_id, revision=ref.revision)
            except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError):
                raise
            except Exception as err:  # noqa: BLE001 (whatever kept the hub from answering: the cache may have it)
                why_local = f"the hub cannot be reached ({_first_line(err)})"
        where = {"revision": ref.revision, "cache_dir": cache, "local_files_only": why_local is not None}
        if ref.filename:
            return Path(huggingface_hub.hf_hub_download(ref.repo_id, ref.filename, **where))
        patterns, weights = LAYOUTS[layout]
        folder = Path(huggingface_hub.snapshot_download(ref.repo_id, allow_patterns=list(patterns), **where))
        if layout == "pipeline" and (folder / "model_index.json").is_file():
            # The components the pipeline names, from the same commit (the folder's name): nothing else of
            # the repository (FLUX.1-dev's and SD3.5's repositories also hold single-file checkpoints).
            components = [name for name, entry in json.loads((folder / "model_index.json").read_text()).items()
                          if not name.startswith("_") and isinstance(entry, list) and entry[:1] != [None]]
            patterns = ("model_index.json", *(f"{c}/{p}" for c in components for p in FOLDER_FILES))
            folder = Path(huggingface_hub.snapshot_download(ref.repo_id, allow_patterns=list(patterns),
                                                            **{**where, "revision": folder.name}))
            weights = tuple(f"{c}/*.safetensors" for c in components if (folder / c / "config.json").is_file())
    except errors.GatedRepoError:
        raise ValueError(f"{option}: {ref} is a gated repository: accept its conditions on huggingface.co and log "
                         f"in with `hf auth login`") from None
    except errors.RepositoryNotFoundError:
        raise ValueError(f"{option}: {ref.repo_id} is neither a local path nor a repository of the hub (or it is "
                         f"private: log in with `hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"{revision_option or option}: {ref.repo_id} has no revision {ref.revision!r} on the "
                         f"hub") from None
    except errors.LocalEntryNotFoundError as err:  # offline or unreachable, and not in the cache
        raise ValueError(_not_cached(ref, option, revision_option, cache, why_local or _first_line(err))) from None
    except errors.EntryNotFoundError:
        raise ValueError(f"{option}: {ref.repo_id} has no file {ref.filename} at revision "
                         f"{ref.revision or 'main'}") from None
    except errors.HfHubHTTPError as err:
        raise OSError(f"{option}: the hub did not give {ref} ({_first_line(err)})") from None
    if layout == "model" and (folder / "model_index.json").is_file():  # e.g. FLUX.1-dev with --model.name embedded
        pipeline = json.loads((folder / "model_index.json").read_text()).get("_class_name")
        choose = ": choose its model with --model.name (sd3, flux, ...)" if option == "--model.path" else ""
        raise ValueError(f"{option}: {ref} is a diffusers pipeline ({pipeline}, model_index.json), not a model "
                         f"folder (config.json + model.safetensors){choose}")
    missing = [pattern for pattern in weights if not any(folder.glob(pattern))] if layout == "pipeline" else \
        ([] if not weights or any((folder / w).is_file() for w in weights) else [" or ".join(weights)])
    if missing:
        # Not fetched now (offline), the cache may lack only what a partial `hf download` left out.
        partial = f"; if the hub has them, fetch them with `{_fetch_command(ref)}` ({why_local})" if why_local else ""
        raise ValueError(f"{option}: {ref} (commit {folder.name}) has no safetensors weights "
                         f"({', '.join(missing)}){f' in the Hugging Face cache {cache}' if why_local else ''}: pec "
                         f"takes only safetensors from the hub (pickled .bin weights can run code); choose a "
                         f"revision that has them, or convert them into a local folder{partial}")
    return folder


def _fetch_command(ref: HubRef) -> str:
    """The `hf` command that fetches `ref` into the hub cache (the whole repository, for a folder)."""
    return f"hf download {ref.repo_id}" + (f" {ref.filename}" if ref.filename else "") + \
        (f" --revision {ref.revision}" if ref.revision else "")


def _not_cached(ref: HubRef, option: str, revision_option: str | None, cache: Path, why: str) -> str:
    """The one line of an id that is neither on this machine nor fetchable now: what the cache holds of
    the repository, why nothing was fetched, and the command that fetches it."""
    how = f"fetch it into that cache with `{_fetch_command(ref)}` (or run pec once where the hub is reachable)"
    what = "file" if ref.filename else "folder"
    held = [] if ref.filename else _cached_revisions(cache, ref.repo_id)
    if held:
        name = revision_option if ref.revision and revision_option else option
        return (f"{name}: the Hugging Face cache {cache} holds {ref.repo_id} at {', '.join(held)} but not at "
                f"{ref.revision or 'main'!r}, and {why}: {how}")
    return (f"{option}: {ref} is neither a local {what} nor in the Hugging Face cache {cache}"
            f"{f' (revision {ref.revision})' if ref.revision else ''}, and {why}: {how}, or give a local {what}")


def _cached_revisions(cache: Path, repo_id: str) -> list[str]:
    """The refs (branches, tags) and commits the cache holds of `repo_id`, for an error message."""
    repo = _repo_folder(cache, repo_id)
    refs = sorted(str(p.relative_to(repo / "refs")) for p in (repo / "refs").rglob("*") if p.is_file())
    commits = sorted(p.name for p in (repo / "snapshots").glob("*") if p.is_dir())
    return refs + [c[:12] for c in commits]


def _repo_folder(cache: Path, repo_id: str) -> Path:
    """The folder of the model repository `repo_id` in the hub cache `cache` (models--ORG--NAME)."""
    return cache / ("models--" + repo_id.replace("/", "--"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
