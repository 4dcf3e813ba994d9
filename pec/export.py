"""`python -m pec.export RUN[@STEP] --out DIR [--merge]`: a trained run as files that diffusers and `pec.sample` load.

RUN is a run folder of `python -m pec.train` (its newest valid checkpoint), RUN@STEP its checkpoint or milestone
of step STEP (`--logging.milestone_every`). What DIR receives:

- A LoRA run, without --merge: a diffusers LoRA. `pytorch_lora_weights.safetensors` is written by the model's
  pipeline class's own `save_lora_weights` (StableDiffusion3Pipeline, FluxPipeline, Flux2Pipeline /
  Flux2KleinPipeline, QwenImagePipeline, WanPipeline), from peft's `get_peft_model_state_dict` of the
  transformer as diffusers' training scripts do: names `transformer.<module>.lora_A.weight` / `lora_B.weight`,
  and the adapter's LoraConfig (rank, alpha, targets) in the file's metadata, so that `load_lora_weights`
  scales it as it was trained:
      pipe = FluxPipeline.from_pretrained(BASE); pipe.load_lora_weights(DIR)
  Wan2.2 A14B (two experts) follows diffusers' convention for the second transformer: each expert's LoRA is a
  file of its own with the same `transformer.` names, and WanPipeline's loader puts a file into the low-noise
  expert when called with `load_into_transformer_2=True`. The high-noise expert's (transformer) is DIR's
  file, the low-noise expert's (transformer_2) is DIR/transformer_2/pytorch_lora_weights.safetensors, named by
  `weight_name` (diffusers reads a top-level file of the default name before a `subfolder`'s):
      pipe.load_lora_weights(DIR)
      pipe.load_lora_weights(DIR, weight_name="transformer_2/pytorch_lora_weights.safetensors",
                             load_into_transformer_2=True)
  (with --model.train_experts low only the second file exists: `load_lora_weights(DIR)` then finds nothing,
  rather than putting the low-noise expert's LoRA into the high-noise expert).
- --merge (a LoRA run), or a full-fine-tuning run (whatever --merge): a whole pipeline folder that
  `DiffusionPipeline.from_pretrained(DIR)` loads: the trained transformer(s) with the adapters merged
  (diffusers' `fuse_lora`, then `unload_lora`), written by `save_pretrained` in the run's --model.dtype, and
  every other component and model_index.json copied from the base model's folder (hard-linked with --link).
- The embedded model has no diffusers pipeline: its exports are in the package's own formats. A LoRA is the
  same LoRA file (SD3's names: its transformer is an SD3Transformer2DModel); --merge or a full-fine-tuning
  run gives the model folder `EmbeddedFlowModel.save` writes (config.json, model.safetensors), which
  `--model.path DIR` and `pec.sample DIR` load.

Every export also holds config.yaml (the run's config), export.json (what was exported: the base model's
--model.name, --model.path (a folder or a hub id) and --model.revision, the run, the step, the kind and the
files) and README.md (a model card: the algorithm and the method with its lambda, the steps, the reward, how to
load it, and the evaluation table of `pec.evaluate` where one is found in the run folder or beside it), so that
`python -m pec.sample DIR` needs nothing else. The export is written into a temporary folder beside DIR and
renamed into place at the end: a failed export leaves no partial DIR.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from pec import __version__
from pec.atomic import atomic_write_text
from pec.checkpoint import has_checkpoint
from pec.cli import command_parser, expected_errors
from pec.config import Config, merge_dicts, to_dict
from pec.evaluate import load_policy, run_config, split_run
from pec.hub import is_hub_id
from pec.models.base import FlowModel
from pec.models.diffusers_model import resolve_dtype
from pec.models.embedded import EmbeddedFlowModel
from pec.policy import Policy, resolve_device

PROG = "pec.export"
FORMAT = 1
MANIFEST = "export.json"
CONFIG = "config.yaml"
CARD = "README.md"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE: what load_lora_weights finds
KINDS = ("lora", "model")  # LoRA files on the base model, or a whole model folder
LORA_PREFIX = "transformer."  # the prefix diffusers' writers give a transformer's LoRA names
# The config section of each regulariser's options (its lambda), for the model card.
METHOD_SECTIONS = {"pec": "pec", "pcgs": "pcgs", "entropy_bonus": "entropy_bonus",
                   "perc_entropy_bonus": "entropy_bonus", "entropy_sample": "entropy_bonus", "clip_cov": "cov",
                   "kl_cov": "cov", "gardo": "gardo", "diverse_grpo": "diverse_grpo"}


def transformer_modules(model: FlowModel) -> dict[str, nn.Module]:
    """Each denoising network of `model` by its pipeline component ("transformer"; Wan2.2 A14B's low-noise
    expert is "transformer_2")."""
    names = getattr(model, "transformer_components", {"": "transformer"})
    return {component: model.transformer.get_submodule(name) if name else model.transformer
            for name, component in names.items()}


def trained_modules(model: FlowModel) -> dict[str, nn.Module]:
    """The networks of `transformer_modules` that hold trainable parameters (LoRA adapters, or the whole network
    under full fine-tuning): what a run changed."""
    return {component: module for component, module in transformer_modules(model).items()
            if any(p.requires_grad for p in module.parameters())}


def lora_file(component: str) -> str:
    """Where a component's LoRA lies in an export: the transformer's at the top (what `load_lora_weights(DIR)`
    finds), any other's (Wan2.2's transformer_2) in a subfolder of its name, where only a `weight_name` naming
    that path finds it."""
    return LORA_WEIGHTS if component == "transformer" else f"{component}/{LORA_WEIGHTS}"


def lora_writer(model: FlowModel) -> type:
    """The diffusers class whose `save_lora_weights` names this model's LoRA: its pipeline's class, or for the
    embedded model (no pipeline) StableDiffusion3Pipeline, whose transformer class it shares."""
    pipeline = getattr(model, "pipeline", None)
    if pipeline is not None:
        return type(pipeline)
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    if not isinstance(model.transformer, SD3Transformer2DModel):
        raise ValueError(f"{type(model).__name__} has no diffusers pipeline whose LoRA writer fits its transformer")
    return StableDiffusion3Pipeline


# ---------------------------------------------------------------------------------------------- writing


def check_out(out: str | Path, force: bool) -> Path:
    """The export folder `out`, refused (ValueError naming --out) when it exists and is not empty, unless
    `force` and it holds an earlier export (export.json): --force never deletes a folder pec did not write."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"--out {out} exists and is not empty: choose another folder, or pass --force to "
                             f"replace an earlier export there")
        if not (out / MANIFEST).is_file():
            raise ValueError(f"--out {out} is not empty and holds no earlier export ({MANIFEST}): --force replaces "
                             f"only an export; choose another folder")
    return out


def run_argument(run: str, name: str = "RUN", expected: str = f"not a run folder of pec.train (no {CONFIG})"
                 ) -> tuple[Path, int | None]:
    """RUN or RUN@STEP as (folder, step) (`pec.evaluate.split_run`), refused in one line naming `name` when STEP
    is not a step number, or (saying `expected`) when the folder is not a run of pec.train (no config.yaml)."""
    folder, step = split_run(run)
    if not (Path(folder) / CONFIG).is_file():
        head, at, tail = run.rpartition("@")
        if at and (Path(head) / CONFIG).is_file():
            raise ValueError(f"{name} {run}: @STEP must be a step number (e.g. {head}@40), got {tail!r}")
        raise ValueError(f"{name} {run}: {expected}")
    return Path(folder), step


def check_base(cfg: Config, source: str) -> None:
    """Refuse in one line naming --model.path a base model given as a local path (absolute, ./ or ~/) that is
    not there (moved, or trained on another machine): loading it would fail deep in a loader. A relative name
    may be a hub id, which the model loader resolves."""
    path = cfg.model.path
    if path and path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        raise ValueError(f"--model.path {path}: the base model of {source} is not there; pass --model.path with "
                         f"its folder (or hub id) on this machine")


def load_run(run: str, device: str | torch.device = "cpu") -> tuple[Config, Policy]:
    """The run's config (its config.yaml) and its policy with the weights of RUN's newest valid checkpoint, or
    of step STEP for RUN@STEP; ValueError (one line) for a folder that is not a run or has no such checkpoint."""
    folder, _ = run_argument(run)
    if not has_checkpoint(folder):
        raise ValueError(f"RUN {run}: no checkpoint (checkpoints/step-*.pt or milestones/step-*.pt): nothing to "
                         f"export; runs write one every --logging.checkpoint_every steps")
    cfg = run_config(run, {"device": str(device)})
    check_base(cfg, f"RUN {run}")
    loading = copy.deepcopy(cfg)
    loading.model.compile = False  # nothing here runs the transformer in a loop
    return cfg, load_policy(run, loading, resolve_device(loading.device))


def write_export(run: str, cfg: Config, policy: Policy, out: Path, *, merge: bool = False, link: bool = False,
                 table: tuple[Path, str, str] | None = None) -> dict[str, Any]:
    """Write the export of `policy` (loaded from `run` by `load_run`) into `out` (checked by `check_out`; see the
    module docstring); return its manifest (export.json). `merge` merges a LoRA run's adapters into a whole model
    folder; `link` hard-links the base model's other components instead of copying them; `table` is the model
    card's evaluation table (`run_table`)."""
    model = policy.model
    trained = trained_modules(model)
    kind = "lora" if policy.lora and not merge else "model"
    folder = Path(split_run(run)[0]).resolve()
    step, checkpoint = policy.checkpoint if policy.checkpoint is not None else (None, None)
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp.mkdir(parents=True)
    try:
        files: dict[str, str] = {}
        if kind == "lora":
            files = write_lora(model, trained, tmp)
        else:
            if policy.lora:
                for module in trained.values():
                    module.fuse_lora()
                    module.unload_lora()
            write_model(model, trained, tmp, link)
        manifest = {
            "format": FORMAT, "pec_version": __version__, "kind": kind, "merged": policy.lora and kind == "model",
            "training": "lora" if policy.lora else "full",
            "model": base_model(cfg),
            "pipeline": None if isinstance(model, EmbeddedFlowModel) else lora_writer(model).__name__,
            "dtype": cfg.model.dtype, "run": str(folder), "step": step,
            "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
            "components": sorted(trained), "lora_files": files,
            "lora": {"rank": cfg.train.lora_rank, "alpha": cfg.train.lora_alpha,
                     "targets": list(model.lora_targets)} if policy.lora else None,
        }
        shutil.copyfile(folder / CONFIG, tmp / CONFIG)  # the run's own file, as it was trained
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        atomic_write_text(tmp / CARD, model_card(to_dict(cfg), manifest, out.resolve(), table))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def write_lora(model: FlowModel, trained: dict[str, nn.Module], out: Path) -> dict[str, str]:
    """Each trained network's LoRA as its pipeline's `save_lora_weights` writes it (`lora_file` says where), with
    its LoraConfig as the file's metadata (diffusers' `_collate_lora_metadata`); {component: file}."""
    from peft import get_peft_model_state_dict

    writer = lora_writer(model)
    files = {}
    for component, module in trained.items():
        name = lora_file(component)
        writer.save_lora_weights(str((out / name).parent), transformer_lora_layers=get_peft_model_state_dict(module),
                                 transformer_lora_adapter_metadata=module.peft_config["default"].to_dict(),
                                 weight_name=LORA_WEIGHTS)
        files[component] = name
    return files


def write_model(model: FlowModel, trained: dict[str, nn.Module], out: Path, link: bool = False) -> None:
    """A whole model folder: the embedded model's own (`EmbeddedFlowModel.save`), or a diffusers pipeline folder
    with the `trained` networks written by `save_pretrained` and everything else from the base model's folder
    (copied, or hard-linked with `link`; its README.md is the base model's card, not this one's)."""
    if isinstance(model, EmbeddedFlowModel):
        model.save(out)
        return
    base = model.source_folder("a whole-model export takes the other components from the base model's folder")
    for component, module in trained.items():
        module.save_pretrained(out / component, safe_serialization=True)
    skip = set(trained) | {CARD, CONFIG, MANIFEST}
    for entry in sorted(base.iterdir()):
        if entry.name in skip or entry.name.startswith("."):
            continue
        copy_file = _link_or_copy if link else shutil.copy2
        if entry.is_dir():
            shutil.copytree(entry, out / entry.name, copy_function=copy_file)
        else:
            copy_file(entry, out / entry.name)


def base_model(cfg: Config) -> dict[str, Any]:
    """The base model an export applies to: --model.name, --model.path (a local folder as an absolute path, so
    that the export samples from any working folder; a hub id as it is; None: the embedded weights shipped with
    the package) and --model.revision where the config has one."""
    path = cfg.model.path
    if path and Path(path).expanduser().is_dir():
        path = str(Path(path).expanduser().resolve())
    return {"name": cfg.model.name, "path": path, "revision": getattr(cfg.model, "revision", None)}


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A hard link of `src` (a file the link resolves to, for a hub cache's symlinks) at `dst`; a copy where the
    file system cannot link (another device)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export `tmp` to `out` (an empty folder, an earlier export that --force replaces, or
    nothing), the old one removed only once the new one is in place."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.old")
            out.rename(old)
        else:
            out.rmdir()
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- model card


def run_table(run: str, policy: Policy, table: str | Path | None = None) -> tuple[Path, str, str] | None:
    """The evaluation table of the model card of `run` (loaded as `policy`): the one `table` names (`read_table`),
    else the newest found beside the run (`find_table`), else None."""
    folder = Path(split_run(run)[0]).resolve()
    step = policy.checkpoint[0] if policy.checkpoint is not None else None
    return read_table(Path(table), folder, step) if table else find_table(folder, step)


def find_table(run_folder: Path, step: int | None) -> tuple[Path, str, str] | None:
    """The newest evaluation table (`pec.evaluate`'s table.md, with its metrics.json) in the run folder or in a
    folder beside it that has a row of this run (named RUN or RUN@STEP): (table.md, its text, the row); None."""
    candidates = [run_folder / "table.md", *run_folder.glob("*/table.md"), *run_folder.parent.glob("*/table.md")]
    found = []
    for path in candidates:
        row = _row_of(path, run_folder, step)
        if row is not None:
            found.append((path.stat().st_mtime, path, row))
    if not found:
        return None
    _, path, row = max(found)
    return path, path.read_text(), row


def read_table(where: Path, run_folder: Path, step: int | None) -> tuple[Path, str, str]:
    """The table `--table` names (table.md or the folder of `pec.evaluate --out`): (table.md, its text, this run's
    row, or "" where it has none); ValueError naming --table when there is none."""
    path = where / "table.md" if where.is_dir() else where
    if not path.is_file():
        raise ValueError(f"--table {where}: no table.md of pec.evaluate there")
    return path, path.read_text(), _row_of(path, run_folder, step) or ""


def _row_of(table: Path, run_folder: Path, step: int | None) -> str | None:
    """The name of this run's row in `pec.evaluate`'s table (its metrics.json's keys), if it has one."""
    try:
        rows = json.loads((table.parent / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    names = [run_folder.name, f"{run_folder.parent.name}/{run_folder.name}"]
    if step is not None:
        names = [f"{n}@{step}" for n in names] + names
    return next((n for n in names if isinstance(rows, dict) and n in rows), None)


def model_card(cfg: dict[str, Any], manifest: dict[str, Any], out: Path, table: tuple[Path, str, str] | None) -> str:
    """README.md of an export: a Hugging Face model card (YAML front matter), what was trained and how, how to
    load it, and the evaluation table where one was found."""
    model, pipeline, kind = manifest["model"], manifest["pipeline"], manifest["kind"]
    path = model["path"]
    hub_id = is_hub_id(path)
    front = {"library_name": "diffusers" if pipeline else "pec",
             "tags": ["pec", "text-to-video" if model["name"] == "wan" else "text-to-image", model["name"],
                      "lora" if kind == "lora" else "merged" if manifest["merged"] else "full-fine-tuning"]}
    if hub_id:
        front["base_model"] = path
    what = {"lora": "LoRA adapters", "model": "a whole model (LoRA merged)" if manifest["merged"] else
            "a whole model (full fine-tuning)"}[kind]
    base = path or "the embedded digits model shipped with pec"
    if model["revision"]:
        base += f" (revision {model['revision']})"
    method, algorithm = cfg["method"], cfg["algorithm"]
    section = cfg.get(METHOD_SECTIONS.get(method, method)) or {}
    options = ", ".join(f"{METHOD_SECTIONS.get(method, method)}.{k} {v}" for k, v in section.items())
    lam = section.get("lambda")
    s, t = cfg["sampling"], cfg["train"]
    rows = [("base model", f"`{base}` (--model.name {model['name']})"), ("export", what),
            ("algorithm", f"{algorithm}" + (f" ({', '.join(f'{k} {v}' for k, v in cfg[algorithm].items())})"
                                            if isinstance(cfg.get(algorithm), dict) else "")),
            ("method (regulariser)", method + (f" ({options})" if options else "")),
            ("lambda", "-" if lam is None else str(lam)),
            ("steps", f"{manifest['step']} of train.steps {t['steps']}"),
            ("reward", f"`{cfg['reward']}`"),
            ("training", "LoRA rank {r}, alpha {a}".format(r=t["lora_rank"], a=t["lora_alpha"]) if t["lora"] else
             "full fine-tuning"),
            ("rollouts", f"{s['prompts_per_step']} prompts x {s['group_size']} samples a step, {s['num_steps']} "
                         f"steps, CFG {s['guidance_scale']}, SDE {s['kind']} eta {s['eta']}"),
            ("run", f"`{manifest['run']}` (checkpoint `{manifest['checkpoint']}`)")]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(manifest['run']).name} (step {manifest['step']})", "",
             f"{what[0].upper() + what[1:]} of `{base}`, trained with pec {manifest['pec_version']} "
             f"(perceptual-entropy RL for flow-matching models).", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "## Use", "", *_usage(cfg, manifest, out), "",
              "config.yaml holds the run's whole configuration; export.json what this folder holds."]
    if table is not None:
        where, text, row = table
        lines += ["", "## Evaluation", "", f"From `{where}` (`python -m pec.evaluate`)"
                  + (f"; this export's row is `{row}`." if row else "."), "", text.strip()]
    return "\n".join(lines) + "\n"


def _usage(cfg: dict[str, Any], manifest: dict[str, Any], out: Path) -> list[str]:
    """The model card's loading snippets: diffusers (where there is a pipeline) and pec.sample."""
    model, pipeline = manifest["model"], manifest["pipeline"]
    prompt = "a handwritten 7" if model["name"] == "embedded" else "a photo of a cat"
    sample = ["```bash", f'python -m pec.sample {out} --prompt "{prompt}" --n 8 --out samples', "```"]
    if pipeline is None:
        return ["The embedded model has no diffusers pipeline: sample it with pec (`--model.path` takes a whole-model "
                "export too).", "", *sample]
    dtype = str(resolve_dtype(cfg["model"]["dtype"]))
    revision = f", revision={model['revision']!r}" if model["revision"] else ""
    code = ["```python", "import torch"]
    if manifest["kind"] == "lora":
        code += [f"from diffusers import {pipeline}", "",
                 f"pipe = {pipeline}.from_pretrained({model['path']!r}, torch_dtype={dtype}{revision})",
                 f"pipe.load_lora_weights({str(out)!r})"]
        if "transformer_2" in manifest["lora_files"]:
            code += [f"pipe.load_lora_weights({str(out)!r}, weight_name={manifest['lora_files']['transformer_2']!r}, "
                     f"load_into_transformer_2=True)  # the low-noise expert"]
    else:
        code += ["from diffusers import DiffusionPipeline", "",
                 f"pipe = DiffusionPipeline.from_pretrained({str(out)!r}, torch_dtype={dtype})  # a {pipeline}"]
    s = cfg["sampling"]
    call = f"pipe({prompt!r}, num_inference_steps={s['num_steps']}"
    if pipeline in ("FluxPipeline", "Flux2Pipeline"):  # guidance-distilled: --model.guidance, no CFG forward
        call += f", guidance_scale={cfg['model']['guidance']}"
    elif model["name"] == "qwen_image":
        call += f", true_cfg_scale={s['guidance_scale']}, negative_prompt={cfg['model']['negative_prompt']!r}"
    else:
        call += f", guidance_scale={s['guidance_scale']}"
    code += [f"result = {call})", "```"]
    return ["With diffusers:", "", *code, "", "With pec (the run's own sampler and settings; `--eval.*` options):", "",
            *sample]


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """An export's export.json, checked; ValueError naming the folder when it is none or of another format."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"{folder} is not an export of pec.export (no readable {MANIFEST}: "
                         f"{err.strerror or err})") from None
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("kind") not in KINDS:
        raise ValueError(f"{path}: not an export manifest of format {FORMAT} (kind one of {KINDS})")
    return manifest


def export_config(folder: str | Path, manifest: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """The config that samples an export: its config.yaml with `overrides` (command-line options). A LoRA
    export applies to the base model its manifest names (an absolute path; `--model.path` may name another
    copy); a whole-model export is itself the model folder (--model.path DIR, nothing to adapt), so
    `--model.path` is refused there."""
    model_overrides = overrides.get("model", {})
    if manifest["kind"] == "model" and "path" in model_overrides:
        raise ValueError(f"--model.path: {folder} is a whole-model export, itself the model; drop --model.path")
    base = {} if "path" in model_overrides else {"model": {"path": manifest["model"]["path"]}}
    cfg = run_config(str(folder), merge_dicts(base, overrides))
    if manifest["kind"] == "model":
        cfg.model.path = str(Path(folder).resolve())
        if hasattr(cfg.model, "revision"):  # the base model's revision, which a local folder has none of
            cfg.model.revision = None
        cfg.train.lora = False
    return cfg


def load_export(folder: str | Path, cfg: Config, device: torch.device) -> Policy:
    """The policy of an export (`cfg` from `export_config`): the whole model, or the base model with the export's
    LoRA files in its adapters (ValueError when they do not fit the adapters the config builds)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    manifest = read_manifest(folder)
    cfg = copy.deepcopy(cfg)
    cfg.train.kl_beta = 0.0  # sampling never needs the full fine-tuning's reference copy
    policy = Policy(cfg, device)
    if manifest["kind"] == "lora":
        modules = transformer_modules(policy.model)
        adapted = sorted(c for c, m in modules.items() if getattr(m, "peft_config", None))
        files = manifest["lora_files"]
        if sorted(files) != adapted:
            raise ValueError(f"{folder}: its LoRA files are for {sorted(files)}, but its config adapts {adapted}")
        for component, name in files.items():
            if not (Path(folder) / name).is_file():
                raise ValueError(f"{folder}: its LoRA file {name} (named in {MANIFEST}) is missing")
            state = load_file(str(Path(folder) / name))
            if not all(k.startswith(LORA_PREFIX) for k in state):
                raise ValueError(f"{Path(folder) / name}: not a diffusers transformer LoRA (names must start with "
                                 f"{LORA_PREFIX!r})")
            result = set_peft_model_state_dict(modules[component], {k[len(LORA_PREFIX):]: v for k, v in state.items()})
            missing = [k for k in result.missing_keys if "lora_" in k]
            if missing or result.unexpected_keys:
                raise ValueError(f"{Path(folder) / name} does not fit the run's adapters: missing {missing[:3]}, "
                                 f"unexpected {result.unexpected_keys[:3]}")
    policy.model.eval()
    return policy


# ---------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m pec.export`."""
    parser = command_parser("python -m pec.export", __doc__)
    parser.add_argument("run", metavar="RUN[@STEP]",
                        help="a run folder (its newest valid checkpoint) or RUN@STEP (its checkpoint or milestone "
                             "of step STEP)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the export folder (new, or empty)")
    parser.add_argument("--merge", action="store_true",
                        help="LoRA runs: merge the adapters into a whole pipeline folder (DiffusionPipeline."
                             "from_pretrained loads it) instead of a LoRA file (load_lora_weights); full-fine-tuning "
                             "runs always export the whole model; embedded runs: the package's model folder")
    parser.add_argument("--link", action="store_true",
                        help="whole-model exports: hard-link the base model's other components instead of copying "
                             "them (no extra disk; the files are then shared with the base folder, so a tool that "
                             "rewrites one in place changes both)")
    parser.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    parser.add_argument("--device", default="cpu",
                        help="where the model loads and adapters merge (default cpu: no GPU needed; 'cuda' is faster "
                             "for large models)")
    parser.add_argument("--table", metavar="PATH", default=None,
                        help="the evaluation table for the model card (pec.evaluate's table.md or --out folder); "
                             "default: the newest one in the run folder or beside it with a row of this run")
    return parser


def export(run: str, out: str | Path, *, merge: bool = False, force: bool = False, link: bool = False,
           device: str = "cpu", table: str | Path | None = None) -> dict[str, Any]:
    """Export `run` (RUN or RUN@STEP) into `out` (see the module docstring); return the manifest."""
    target = check_out(out, force)
    cfg, policy = load_run(run, device)
    return write_export(run, cfg, policy, target, merge=merge, link=link, table=run_table(run, policy, table))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m pec.export`, with the exit codes of `pec.cli`: 2 with one line for input refused
    (a RUN that is not a run or has no such checkpoint, an --out that is not empty, a base model that is gone),
    1 with one line for a failure while writing (a full disk)."""
    args = build_parser().parse_args(argv)
    with expected_errors(PROG, before_work=True):
        out = check_out(args.out, args.force)
        cfg, policy = load_run(args.run, args.device)
        if args.link and policy.lora and not args.merge:
            raise ValueError("--link: a LoRA export copies nothing from the base model; --link applies with --merge "
                             "or to a full-fine-tuning run")
        table = run_table(args.run, policy, args.table)
    with expected_errors(PROG):
        manifest = write_export(args.run, cfg, policy, out, merge=args.merge, link=args.link, table=table)
    what = {"lora": "LoRA", "model": "whole model"}[manifest["kind"]]
    print(f"exported {what} of {manifest['run']} at step {manifest['step']} to {out}/ (see its README.md)")


if __name__ == "__main__":
    main()
