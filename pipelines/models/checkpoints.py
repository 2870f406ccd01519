"""Training checkpoints as safetensors + JSON: nothing is unpickled when a run resumes.

A checkpoint folder holds, per module, `<name>.safetensors` (the state dict of a module, or of anything with
`state_dict` / `load_state_dict`, such as a U-Net's LoRA adapters alone); per optimiser,
`<name>.safetensors` (its tensor state) + `<name>.json` (param groups and scalar state); and `meta.json`
(step, resolved config, anything else JSON-serialisable the stage wants to carry).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from ldm_core.ema import unwrap_model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP and torch.compile wrappers (or the module itself): state-dict keys stay plain."""
    return unwrap_model(model)


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_process_umask()
"""The mode a new file of this process gets (0644 under the usual umask 022)."""


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file with the mode any other file of this process gets: safetensors itself writes owner-only
    (0600), which would leave checkpoints and exports in a shared folder unreadable to the rest of a team."""
    save_file(_cpu(tensors), str(path), metadata=metadata)
    os.chmod(path, FILE_MODE)


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into tensors (for safetensors) and the JSON-able rest."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in rest.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    # JSON turned tuples (Adam's betas) into lists; give them back their type.
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    directory: str | Path,
    *,
    modules: Mapping[str, Any],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    meta: Mapping[str, Any],
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        sd = unwrap(module).state_dict() if hasattr(module, "state_dict") else module  # a module, or its part
        save_tensors(directory / f"{name}.safetensors", sd)
    for name, opt in (optimizers or {}).items():
        tensors, rest = optimizer_to_files(opt)
        save_tensors(directory / f"{name}.safetensors", tensors)
        (directory / f"{name}.json").write_text(json.dumps(rest))
    (directory / "meta.json").write_text(json.dumps(dict(meta), indent=2, sort_keys=True, default=str))
    return directory


def load_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "meta.json").read_text())


def damage(directory: str | Path) -> str:
    """What is wrong with a checkpoint folder ("" when intact): an unreadable `meta.json`, or a safetensors file
    whose size is not the one its header declares (a truncated copy or upload). Reads headers only."""
    directory = Path(directory)
    try:
        load_meta(directory)
    except (OSError, ValueError) as e:
        return f"meta.json: {type(e).__name__}"
    for file in sorted(directory.glob("*.safetensors")):
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(header_len)) if 8 + header_len <= size else None
            except ValueError:
                header = None
        if not isinstance(header, dict):
            return f"{file.name}: unreadable header ({size} bytes)"
        end = 8 + header_len + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if size != end:
            return f"{file.name}: {size} bytes where its header declares {end} (truncated)"
    return ""


def load_module(directory: str | Path, name: str, module: torch.nn.Module, strict: bool = True) -> None:
    unwrap(module).load_state_dict(load_file(str(Path(directory) / f"{name}.safetensors")), strict=strict)


def load_tensors(directory: str | Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / f"{name}.safetensors"))


def load_optimizer(directory: str | Path, name: str, opt: torch.optim.Optimizer) -> None:
    directory = Path(directory)
    rest = json.loads((directory / f"{name}.json").read_text())
    opt.load_state_dict(optimizer_from_files(load_file(str(directory / f"{name}.safetensors")), rest))
