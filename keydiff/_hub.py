"""Hugging Face inputs, offline: repo ids and ``hf-hub:`` names from the local cache, cache folders, config folders.

Nothing is downloaded. A repo id (``google/vit-base-patch16-224``) is looked up in the cache that
``huggingface_hub`` fills (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``); a cache
folder ``models--org--name`` stands for its newest snapshot (the one ``refs/main`` names, else the newest by time);
a folder with a ``config.json`` is a model: a timm one when the config names an ``architecture`` (timm's
``push_to_hf_hub`` layout), else transformers (the config's ``architectures[0]``, else ``AutoModel``).
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keydiff._errors import CheckpointError, ModelError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LIBRARIES", "check_config_args", "config_args", "folder_factory", "hub_cache", "library_factory",
           "library_of", "local_path", "model_folder"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".th", ".json")
# config.json fields that describe the file, not the model: never passed to a config class
_FILE_FIELDS = frozenset({"architectures", "model_type", "transformers_version", "_name_or_path", "dtype",
                          "torch_dtype"})


def hub_cache() -> Path:
    """The Hugging Face hub cache directory, from the environment as ``huggingface_hub`` reads it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "huggingface" / "hub"


def _snapshot(folder: Path) -> Path | None:
    """A cache folder's newest snapshot: the one ``refs/main`` names, else the most recently modified."""
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = folder / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def local_path(spec: str) -> str:
    """The local path a checkpoint spec stands for: a cache folder's snapshot, a cached repo id's snapshot, or
    ``spec`` itself.

    Raises:
        CheckpointError: ``spec`` is a repo id that is not in the cache (the message says how to fetch it).

    Example:
        >>> local_path("fixtures/vit_tiny_renamed.safetensors")
        'fixtures/vit_tiny_renamed.safetensors'
    """
    spec = spec.removeprefix("hf-hub:")
    if os.path.exists(spec):
        return str(_snapshot(Path(spec)) or spec)
    if not _REPO_ID.match(spec) or spec.lower().endswith(_FILE_SUFFIXES):
        return spec
    cache = hub_cache()
    snapshot = _snapshot(cache / f"models--{spec.replace('/', '--')}")
    if snapshot is None:
        raise CheckpointError(spec, f"is not a file, and the Hugging Face repo {spec} is not in the local cache "
                                    f"({cache}; keydiff downloads nothing)",
                              f"Fetch it with: hf download {spec} (or set HF_HUB_CACHE / HF_HOME to your cache).")
    return str(snapshot)


def model_folder(spec: str) -> Path | None:
    """The folder holding ``config.json`` that a model spec names (a folder, a cache folder, a cached repo id,
    ``hf-hub:org/name``), or None when the spec is not one."""
    if ":" in spec and not spec.startswith("hf-hub:"):
        return None
    if not spec.startswith("hf-hub:") and not os.path.isdir(spec) and not _REPO_ID.match(spec):
        return None
    try:
        folder = Path(local_path(spec))
    except CheckpointError as exc:
        if spec.startswith("hf-hub:"):
            raise ModelError(str(exc)) from exc
        return None  # a name like org/name that is not cached may still be something else
    return folder if (folder / "config.json").is_file() else None


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder / 'config.json'}: cannot be read as JSON ({exc})") from exc


def folder_factory(folder: Path) -> Callable[..., nn.Module]:
    """What builds the model a config folder describes, with keyword arguments overriding the config."""
    cfg = _read_config(folder)
    if isinstance(cfg, Mapping) and isinstance(cfg.get("_class_name"), str):  # diffusers' layout: class + arguments
        return _diffusers_factory(folder, cfg)
    if "architecture" in cfg:  # timm's layout: the model name, its arguments, its pretrained config
        import timm

        return lambda **kw: timm.create_model(f"local-dir:{folder}", pretrained=False, **kw)
    try:
        import transformers
    except ImportError as exc:
        raise ModelError(f"{folder} holds a transformers config.json, and transformers is not installed") from exc
    names = cfg.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None

    def build(**kw: Any) -> nn.Module:
        config = transformers.AutoConfig.from_pretrained(str(folder), **kw)
        if cls is not None:
            return cls(config)
        return transformers.AutoModel.from_config(config)

    return build


LIBRARIES = ("transformers", "diffusers")
"""Libraries whose model classes a ``library:Class`` spec names, built from their configuration."""


def _library_class(library: str, name: str) -> type:
    spec = f"{library}:{name}"
    try:
        module = importlib.import_module(library)
    except ImportError as exc:
        raise ModelError(f"{spec}: {library} is not installed (pip install {library})") from exc
    cls = getattr(module, name, None) if name.isidentifier() else None
    base = getattr(module, "PreTrainedModel" if library == "transformers" else "ModelMixin")
    if not (isinstance(cls, type) and issubclass(cls, base) and cls is not base):
        raise ModelError(f"{library} has no model class {name!r}{_suggest_among(name, _class_names(module))}")
    return cls


def library_factory(library: str, name: str) -> Callable[..., nn.Module]:
    """What builds ``library:Class`` from its configuration arguments: a transformers class from its config class
    (``cls(cls.config_class(**kw))``), a diffusers class from its registered ``__init__`` arguments.

    Raises:
        ModelError: the library is not installed, or it has no model class of that name (close names are
            suggested).
    """
    cls = _library_class(library, name)
    if library == "transformers":
        return lambda **kw: cls(cls.config_class(**kw))
    return lambda **kw: cls(**kw)


def check_config_args(spec: str, args: Mapping[str, Any]) -> None:
    """Refuse an argument the user typed for a transformers or diffusers model that its configuration does not
    know: transformers keeps it as a stray attribute and diffusers drops it with a warning, so a misspelt size
    would build a model of the default size silently. A config file's own fields are not checked here: the
    libraries tolerate old ones, and so does keydiff.

    Raises:
        ModelError: an unknown argument (close names are suggested).

    Example:
        >>> try:
        ...     check_config_args("diffusers:AutoencoderKL", {"latent_chanels": 4})
        ... except ModelError as exc:
        ...     print(exc)
        diffusers:AutoencoderKL has no configuration argument 'latent_chanels'; did you mean latent_channels?
    """
    library, _, name = spec.partition(":")
    if not args or library not in LIBRARIES:
        return
    cls = _library_class(library, name)
    if library == "transformers":
        default = cls.config_class()
        config = cls.config_class(**args)
        known = [k for k in vars(default) if not k.startswith("_")]
        # a transformers config keeps an argument it does not know as an attribute of its own
        _refuse_unknown(spec, [k for k in args if k in vars(config) and not hasattr(default, k)], known)
        return
    params = _init_params(cls)
    if params is not None:
        _refuse_unknown(spec, [k for k in args if k not in params], sorted(params))


def _init_params(cls: type) -> set[str] | None:
    """A diffusers class's configuration arguments, or None when its ``__init__`` takes any (``**kwargs``)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params) - {"self"}


def _class_names(module: Any) -> list[str]:
    return [n for n in dir(module) if n[:1].isupper()]


def _refuse_unknown(spec: str, unknown: list[str], known: list[str]) -> None:
    if unknown:
        raise ModelError(f"{spec} has no configuration argument {unknown[0]!r}{_suggest_among(unknown[0], known)}")


def _suggest_among(name: str, choices: list[str]) -> str:
    from rapidfuzz import process

    close = [c for c, score, _ in process.extract(name, sorted(choices), limit=3) if score >= 80]
    return f"; did you mean {', '.join(close)}?" if close else ""


def _diffusers_factory(folder: Path, cfg: Mapping[str, Any]) -> Callable[..., nn.Module]:
    """A diffusers model from its ``config.json``: ``_class_name`` names the class, the other fields (those not
    starting with ``_``) are its arguments, keyword arguments on top."""
    build = library_factory("diffusers", cfg["_class_name"])
    fields = _diffusers_fields(cfg)
    return lambda **kw: build(**{**fields, **kw})


def _diffusers_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ``config.json``'s arguments for its class: as ``from_config`` takes them, the private
    (``_``-prefixed) fields and the ones the class no longer takes left out."""
    fields = {k: v for k, v in cfg.items() if not k.startswith("_")}
    params = _init_params(_library_class("diffusers", cfg["_class_name"]))
    return fields if params is None else {k: v for k, v in fields.items() if k in params}


def library_of(spec: str) -> str:
    """The library whose model a spec names: ``transformers`` or ``diffusers`` (``library:Class``, or a folder whose
    ``config.json`` is theirs), ``timm`` (a timm config folder), else ``""``.

    Example:
        >>> library_of("transformers:BertModel"), library_of("resnet50")
        ('transformers', '')
    """
    library = spec.partition(":")[0]
    if library in LIBRARIES:
        return library
    folder = model_folder(spec)
    if folder is None:
        return ""
    cfg = _read_config(folder)
    if not isinstance(cfg, Mapping) or "architecture" in cfg:
        return "timm"
    return "diffusers" if "_class_name" in cfg else "transformers"


def config_args(model: str, checkpoint: str) -> dict[str, Any]:
    """For ``transformers:ModelClass`` or ``diffusers:ModelClass`` and a checkpoint in a folder with a
    ``config.json``: that config's fields, as the model's keyword arguments (the user's ``-m`` arguments go on
    top). Otherwise nothing."""
    if not model.startswith(("transformers:", "diffusers:")):
        return {}
    try:
        path = Path(local_path(checkpoint))
    except CheckpointError:
        return {}
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        return {}
    cfg = _read_config(folder)
    if not isinstance(cfg, Mapping):
        return {}
    if model.startswith("diffusers:"):
        return _diffusers_fields({**cfg, "_class_name": model.partition(":")[2]})
    return {k: v for k, v in cfg.items() if k not in _FILE_FIELDS}
