"""Load and save models: the entry point of the flow.

``load_model(spec)`` turns any of the model specs misfeat accepts into a
TransformerLens ``HookedTransformer`` with its tokenizer:

- a misfeat checkpoint directory (``misfeat_model.json`` + ``model.safetensors`` +
  tokenizer files), written by :func:`save_model` and read back bit-exactly;
- a local Hugging Face directory (``config.json`` + weights + tokenizer) of any
  architecture TransformerLens supports, plus Gemma and Gemma 2, loaded fully offline;
  the architecture comes from ``config.json``, never from the path (see :mod:`misfeat.hf`);
  BOS follows the tokenizer unless ``prepend_bos`` says otherwise;
- an official TransformerLens model name (needs the Hugging Face hub; offline it fails
  at once and says so);
- ``<plug-in>:<spec>``, a model a plug-in provides (:mod:`misfeat.registry`), such as
  ``organism:<stage>``, the built-in model organism (built on first use).

Device policy: CUDA when available, else CPU, unless ``device`` is given.
Dtype policy: float32 unless ``dtype`` is given; the choice is always logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat import registry
from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "misfeat_model.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FORMAT = "misfeat-checkpoint"
CHECKPOINT_VERSION = 1

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


class ModelLoadError(MisfeatError):
    """A model spec could not be loaded; the message says why and what to do instead."""


@dataclass(frozen=True)
class ModelInfo:
    """Where a loaded model came from, attached to it as ``model.misfeat_info``.

    Attributes:
        spec: the spec it was loaded from, as given.
        source: ``misfeat``, ``hf-local``, ``hub``, ``memory`` or the plug-in's name (``organism``).
        path: the directory it was read from, if any.
        meta: free-form metadata saved with a misfeat checkpoint (the organism's world
            description lives here: domains, EM domain, vocabulary).
    """

    spec: str
    source: str
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def model_info(model: HookedTransformer) -> ModelInfo:
    """The :class:`ModelInfo` of ``model`` (a placeholder for models built in code)."""
    info = getattr(model, "misfeat_info", None)
    if isinstance(info, ModelInfo):
        return info
    return ModelInfo(spec="<in-memory>", source="memory")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means CUDA when available, else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"device {device} is not supported; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} was asked for but CUDA is not available; use device='cpu'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None = None) -> torch.dtype:
    """``dtype`` as a ``torch.dtype``; ``None`` means float32 (the policy, logged by callers)."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def move_model(model: HookedTransformer, device: str | torch.device) -> HookedTransformer:
    """Move a single-device model and keep ``cfg.device`` in step, without TransformerLens's log line."""
    import torch

    torch.nn.Module.to(model, device)
    model.cfg.device = str(device)
    return model


def load_model(
    spec: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    process_weights: bool = False,
    prepend_bos: bool | None = None,
) -> HookedTransformer:
    """Load ``spec`` as a HookedTransformer with its tokenizer, in eval mode.

    Args:
        spec: a misfeat checkpoint directory, a local Hugging Face directory, an official
            TransformerLens model name, or ``organism:<stage>``.
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to float32 (logged). ``"bfloat16"`` halves memory.
        process_weights: for Hugging Face weights only: fold layer norms and centre the
            writing weights as ``HookedTransformer.from_pretrained`` does. Off by default,
            so activations equal the Hugging Face model's hidden states.
        prepend_bos: for Hugging Face directories: whether to prepend BOS to each prompt.
            Default: follow the tokenizer (prepend only where ``tokenizer(text)`` adds one).
            Kept in ``model.cfg.default_prepend_bos`` and in checkpoints saved from it.
    """
    spec_str = str(spec)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    logger.info(
        "loading %s on %s as %s%s", spec_str, torch_device, dtype_name(torch_dtype),
        "" if dtype is not None else " (default; pass dtype='bfloat16' to halve memory)",
    )
    plugin = registry.for_spec(spec_str)
    if plugin is not None and plugin.checkpoint is not None:
        path = plugin.checkpoint(spec_str)
        return _load_checkpoint(path, torch_device, torch_dtype, spec=spec_str, source=plugin.name)
    path = Path(spec_str).expanduser()
    if path.is_dir():
        if (path / CHECKPOINT_FILE).is_file():
            return _load_checkpoint(path, torch_device, torch_dtype, spec=spec_str, source="misfeat")
        if (path / "config.json").is_file():
            return _load_hf_dir(path, torch_device, torch_dtype, process_weights, spec=spec_str,
                                prepend_bos=prepend_bos)
        raise ModelLoadError(
            f"directory {path} is neither a misfeat checkpoint (no {CHECKPOINT_FILE}) nor a "
            "Hugging Face model directory (no config.json)"
        )
    if path.exists():
        raise ModelLoadError(f"{path} is a file; a model spec is a directory, a model name or organism:<stage>")
    if os.sep in spec_str or spec_str.startswith((".", "~")):
        raise ModelLoadError(f"model directory {path} does not exist")
    return _load_hub(spec_str, torch_device, torch_dtype, process_weights)


# --- misfeat checkpoints -------------------------------------------------------------


def _cfg_to_json(cfg: Any) -> dict[str, Any]:
    out = {}
    for key, value in cfg.to_dict().items():
        if key in ("device", "n_devices"):
            continue
        if key == "dtype":
            value = dtype_name(value)
        try:
            json.dumps(value)
        except TypeError:
            logger.debug("not saving config field %s (not JSON-serialisable)", key)
            continue
        out[key] = value
    return out


def save_model(model: HookedTransformer, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None,
               format: str = "misfeat") -> Path:
    """Write ``model`` as a misfeat checkpoint: config JSON, safetensors weights, tokenizer.

    ``format="hf"`` writes a Hugging Face directory instead (config.json, safetensors,
    tokenizer, generation_config.json) whose logits equal misfeat's; it needs a model
    loaded from a Hugging Face directory or a misfeat checkpoint of one (see
    :func:`misfeat.export.export_hf`).

    ``meta`` (JSON-serialisable) is stored beside the config; when omitted, the metadata
    the model was loaded with (``model.misfeat_info.meta``) is kept. Files are written to
    a temporary name and renamed, so a crash never leaves a half-written checkpoint.
    """
    from safetensors.torch import save_file

    if format == "hf":
        from misfeat.export import export_hf
        from misfeat.hf import HFLoadError

        try:
            return export_hf(model, out_dir)
        except HFLoadError as err:
            raise ModelLoadError(str(err)) from None
    if format != "misfeat":
        raise ValueError(f"unknown format {format!r}; use 'misfeat' or 'hf'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if meta is None:
        meta = model_info(model).meta
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, out / WEIGHTS_FILE)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    doc = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "cfg": _cfg_to_json(model.cfg),
        "meta": meta,
    }
    tmp = out / (CHECKPOINT_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out / CHECKPOINT_FILE)
    return out


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` block of a misfeat checkpoint, without loading weights."""
    doc = _read_checkpoint_doc(Path(path))
    return doc.get("meta", {})


def _read_checkpoint_doc(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads((path / CHECKPOINT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {path / CHECKPOINT_FILE}: {err}") from err
    if doc.get("format") != CHECKPOINT_FORMAT or doc.get("version", 0) > CHECKPOINT_VERSION:
        raise ModelLoadError(
            f"{path / CHECKPOINT_FILE} is not a misfeat checkpoint this version can read "
            f"(format={doc.get('format')!r}, version={doc.get('version')!r})"
        )
    return doc


def _load_checkpoint(path: Path, device, dtype, *, spec: str, source: str) -> HookedTransformer:
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    doc = _read_checkpoint_doc(path)
    cfg_dict = dict(doc["cfg"])
    cfg_dict["dtype"] = dtype
    cfg_dict["device"] = str(device)
    try:
        cfg = HookedTransformerConfig.from_dict(cfg_dict)
    except TypeError as err:
        raise ModelLoadError(f"{path / CHECKPOINT_FILE}: config not understood by this TransformerLens: {err}") from err
    has_tokenizer = any((path / name).is_file() for name in _TOKENIZER_FILES)
    tokenizer = _load_tokenizer(path) if has_tokenizer else None
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    try:
        state = load_file(str(path / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own error types
        raise ModelLoadError(f"cannot read weights {path / WEIGHTS_FILE}: {err}") from err
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    move_model(model, device)
    model.eval()
    model.misfeat_info = ModelInfo(spec=spec, source=source, path=str(path), meta=doc.get("meta", {}))
    return model


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save one beside the "
            "weights with tokenizer.save_pretrained(dir)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises many error types here
        raise ModelLoadError(f"cannot load the tokenizer saved in {path}: {err}") from err


# --- local Hugging Face directories --------------------------------------------------


def _load_hf_dir(path: Path, device, dtype, process_weights: bool, *, spec: str,
                 prepend_bos: bool | None = None) -> HookedTransformer:
    from misfeat.hf import HFLoadError, load_hf_dir

    tokenizer = _load_tokenizer(path)
    try:
        model, meta = load_hf_dir(path, device, dtype, process_weights, tokenizer, prepend_bos=prepend_bos)
    except HFLoadError as err:
        raise ModelLoadError(str(err)) from err.__cause__
    move_model(model, device)
    model.eval()
    model.misfeat_info = ModelInfo(spec=spec, source="hf-local", path=str(path), meta=meta)
    return model


# --- the hub -------------------------------------------------------------------------


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(name: str, device, dtype, process_weights: bool) -> HookedTransformer:
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    try:
        official = loading.get_official_model_name(name)
    except ValueError as err:
        raise ModelLoadError(
            f"{name!r} is not a directory, not organism:<stage> and not an official TransformerLens "
            "model name"
        ) from err
    if not _hub_reachable() and not _in_hub_cache(official):
        raise ModelLoadError(
            f"{name!r} ({official}) needs the Hugging Face hub, which is offline or unreachable here, and "
            "it is not in the local cache. Download it elsewhere and pass its local directory "
            "(config.json + weights + tokenizer) instead, e.g. load_model('/path/to/model')"
        )
    loader = HookedTransformer.from_pretrained if process_weights else HookedTransformer.from_pretrained_no_processing
    try:
        model = loader(official, device=str(device), dtype=dtype)
    except OSError as err:
        raise ModelLoadError(f"could not load {official} from the hub or its cache: {err}") from err
    model.eval()
    model.misfeat_info = ModelInfo(spec=name, source="hub", path=None, meta={})
    return model


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


# --- fingerprints --------------------------------------------------------------------


def architecture_fingerprint(model: HookedTransformer) -> str:
    """A short hash of a model's configuration alone (not its weights): equal for a model
    and its fine-tunes, different for another architecture or vocabulary."""
    cfg = _cfg_to_json(model.cfg)
    for key in ("seed", "dtype", "model_name", "checkpoint_index", "checkpoint_value"):
        cfg.pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(model: HookedTransformer) -> str:
    """A short stable hash of a model's configuration and weights (sha256, 16 hex chars).

    Two models with the same fingerprint compute the same function; stores written
    with a model record it so that a resume with another model is refused.
    """
    import torch

    digest = hashlib.sha256()
    cfg = _cfg_to_json(model.cfg)
    for key in ("seed", "dtype"):
        cfg.pop(key, None)
    digest.update(json.dumps(cfg, sort_keys=True).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            t = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(str(t.dtype).encode() + str(tuple(tensor.shape)).encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
