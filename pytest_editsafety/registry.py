"""Which model a ``--model`` value means, and loading it.

``resolve_model`` turns what the user typed (a built-in name, a local directory, a Hugging Face repo id)
into a ``ModelSpec`` without touching torch, so the plugin can validate options at startup.
``load_model`` does the heavy work: transformers is imported there, not at module import.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from editors.families import (
    ArchitectureFamily,
    UnsupportedArchitectureError,
    family_for_model_type,
)

__all__ = [
    "BUILTIN_MODELS",
    "DTYPES",
    "IncompatibleTokenizerError",
    "InvalidModelDirectoryError",
    "LoadOptions",
    "LoadedModel",
    "ModelSpec",
    "ModelUnavailableError",
    "UnknownModelError",
    "load_model",
    "local_identity",
    "resolve_model",
]

log = logging.getLogger(__name__)

Source = Literal["zoo", "hub", "local"]
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "auto")
ORGANISM_MANIFEST = "editsafety_organism.json"

# An organism trained with transformers' gelu_new (tanh-approximated GELU written as six elementwise operations)
# runs as gelu_pytorch_tanh, PyTorch's fused kernel of the same formula: outputs agree to float rounding (4.8e-7 at
# most over a million inputs of scale 4, per-sentence NLLs to 9e-7 relative) and a certified case on tiny-gpt2
# costs about 15 % less on a CPU (v*'s search 18 %: one autograd node instead of six). Organisms only: a user's
# model runs with the kernels its config names.
ORGANISM_ACTIVATIONS: Mapping[str, str] = MappingProxyType({"gelu_new": "gelu_pytorch_tanh"})

# Files whose content decides what a local directory computes: the weights and the tokenizer.
_WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf"})
_TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "added_tokens.json",
    }
)

# Hugging Face repo ids: owner/name, each part alphanumerics plus . _ -, not starting or ending with . or -.
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID_RE = re.compile(rf"^(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]*))?$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SNAPSHOT_RE = re.compile(r"snapshots[/\\]([0-9a-f]{40})(?:[/\\]|$)")


class UnknownModelError(ValueError):
    """``--model`` names neither a built-in model, an existing local directory nor a Hugging Face repo id."""


class InvalidModelDirectoryError(UnknownModelError):
    """A local model directory whose config.json is missing, unreadable or lacks a model_type."""


class ModelUnavailableError(ValueError):
    """The model's weights or tokenizer cannot be obtained here (not cached, offline, gated, missing files)."""


class IncompatibleTokenizerError(ValueError):
    """The tokenizer produces ids the model has no embedding for."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: Source
    # hub: the repo id; local: the absolute directory; zoo: the organism name
    location: str
    # "" for a hub repo until its config has been read at load time
    family: str
    revision: str | None
    description: str


def _hub(name: str, repo: str, family: str, description: str) -> ModelSpec:
    return ModelSpec(name=name, source="hub", location=repo, family=family, revision=None, description=description)


def _zoo(name: str, family: str, description: str) -> ModelSpec:
    return ModelSpec(name=name, source="zoo", location=name, family=family, revision=None, description=description)


BUILTIN_MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            _hub("gpt2", "openai-community/gpt2", "gpt2", "GPT-2 small (124M parameters)"),
            _hub("gpt2-xl", "openai-community/gpt2-xl", "gpt2", "GPT-2 XL (1.5B parameters), the ROME papers' model"),
            _hub("gpt-j", "EleutherAI/gpt-j-6B", "gptj", "GPT-J (6B parameters)"),
            _hub("llama2-7b", "meta-llama/Llama-2-7b-hf", "llama", "Llama-2 7B (gated repo)"),
            _hub("mistral-7b", "mistralai/Mistral-7B-v0.1", "mistral", "Mistral 7B v0.1"),
            _hub("llama3-8b", "meta-llama/Meta-Llama-3-8B", "llama", "Llama-3 8B (gated repo)"),
            _zoo("tiny-gpt2", "gpt2", "model organism: tiny GPT-2 trained by the project on a synthetic world"),
            _zoo("tiny-gptj", "gptj", "model organism: tiny GPT-J trained by the project on a synthetic world"),
            _zoo("tiny-llama", "llama", "model organism: tiny Llama trained by the project on a synthetic world"),
            _zoo("tiny-gpt2-sink", "gpt2", "model organism of the prototypes' recipe: tiny GPT-2 trained behind a "
                 "sink token in every window, so a prompt's first token is out of distribution"),
        )
    }
)

# the depth of each built-in hub model as its published config.json gives it (n_layer / num_hidden_layers): what is
# known of its layers before anything is downloaded (model_check.known_config), so that the layers its
# hyper-parameters name are resolved and checked before a run downloads gigabytes
PUBLISHED_DEPTHS: Mapping[str, int] = MappingProxyType({
    "openai-community/gpt2": 12, "openai-community/gpt2-xl": 48, "EleutherAI/gpt-j-6B": 28,
    "meta-llama/Llama-2-7b-hf": 32, "mistralai/Mistral-7B-v0.1": 32, "meta-llama/Meta-Llama-3-8B": 32,
})

_FAMILY_OF_KNOWN_REPO: Mapping[str, str] = MappingProxyType(
    {spec.location: spec.family for spec in BUILTIN_MODELS.values() if spec.source == "hub"}
)


def _accepted_forms() -> str:
    return (
        f"built-in names: {', '.join(BUILTIN_MODELS)}; "
        "a local directory holding a save_pretrained model and tokenizer (with config.json); "
        "or a Hugging Face repo id 'owner/name', optionally pinned as 'owner/name@revision'"
    )


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in text or text.count("/") > 1


def read_model_type(directory: Path) -> str:
    """``model_type`` from ``directory/config.json``, with errors that name the file."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise InvalidModelDirectoryError(
            f"{config_path}: missing; a local model directory must hold a save_pretrained model (config.json, "
            "weights, tokenizer files)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidModelDirectoryError(f"{config_path}: unreadable: {err}") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise InvalidModelDirectoryError(f"{config_path}: no 'model_type' string field")
    return model_type


def resolve_model(name_or_path: str) -> ModelSpec:
    """The ``ModelSpec`` for a ``--model`` value; cheap (reads at most one config.json)."""
    text = name_or_path.strip()
    if not text:
        raise UnknownModelError(f"empty model name; accepted: {_accepted_forms()}")
    if text in BUILTIN_MODELS:
        return BUILTIN_MODELS[text]

    alias, sep, revision = text.partition("@")
    if sep and alias in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[alias]
        if builtin.source != "hub" or not revision:
            raise UnknownModelError(
                f"model {text!r}: only Hugging Face models take an '@revision'; {alias!r} is a "
                f"{builtin.source} model"
            )
        return dataclasses.replace(builtin, name=text, revision=revision)

    path = Path(text).expanduser()
    if path.is_dir():
        directory = path.resolve()
        model_type = read_model_type(directory)
        try:
            family = family_for_model_type(model_type)
        except UnsupportedArchitectureError as err:
            raise UnsupportedArchitectureError(f"{directory / 'config.json'}: {err}") from None
        return ModelSpec(
            name=name_or_path,
            source="local",
            location=str(directory),
            family=family.name,
            revision=None,
            description=f"local {model_type} model in {directory}",
        )
    if path.exists():
        raise UnknownModelError(f"model {text!r} is a file, not a directory; accepted: {_accepted_forms()}")

    match = _HUB_ID_RE.match(text)
    if match and ".." not in text and "--" not in match["repo"]:
        repo = match["repo"]
        return ModelSpec(
            name=name_or_path,
            source="hub",
            location=repo,
            family=_FAMILY_OF_KNOWN_REPO.get(repo, ""),
            revision=match["revision"],
            description=f"Hugging Face model {repo}",
        )
    if _looks_like_path(text):
        raise UnknownModelError(f"model {text!r}: no such local directory; accepted: {_accepted_forms()}")
    raise UnknownModelError(f"unknown model {text!r}; accepted: {_accepted_forms()}")


@dataclass(frozen=True)
class LoadOptions:
    # Hugging Face dtype names; None keeps transformers' default ("auto": the checkpoint's own dtype)
    dtype: str | None = None
    device_map: str | None = None
    revision: str | None = None
    # None follows HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set when load_model runs
    local_files_only: bool | None = None
    # where organisms are built and kept (None: pytest_editsafety.cache.cache_root()'s default)
    cache_root: str | None = None
    # the BOS-stripped protocol (pytest_editsafety.bos): the tokenizer stops prepending its BOS; a no-op for
    # tokenizers that prepend none
    strip_bos: bool = False

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"LoadOptions.dtype: unsupported value {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.local_files_only is not None and not isinstance(self.local_files_only, bool):
            raise ValueError(f"LoadOptions.local_files_only: expected a bool or None, got {self.local_files_only!r}")
        if not isinstance(self.strip_bos, bool):
            raise ValueError(f"LoadOptions.strip_bos: expected a bool, got {self.strip_bos!r}")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    spec: ModelSpec
    family: ArchitectureFamily
    n_layers: int
    # Names the exact weights: organism recipe hash (zoo), "repo@commit" (hub), "local:<hash>" (local); with
    # bos.STRIPPED_SUFFIX when the tokenizer's BOS was stripped (the keys, and all cached from them, differ)
    identity: str
    # the BOS-stripped protocol took effect: the tokenizer prepended a BOS and no longer does (pytest_editsafety.bos)
    bos_stripped: bool = False


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline_env() -> bool:
    return _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")


def hub_cache_dir() -> str | None:
    """The hub cache the environment names *now*; huggingface_hub reads it only once, at import."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    import huggingface_hub.errors as hub_errors

    errors: list[type[BaseException]] = [OSError, hub_errors.EntryNotFoundError]
    # The HTTP client's own base error (httpx's or requests', by huggingface_hub version) is not an OSError.
    transport = getattr(hub_errors, "HTTPError", None)
    if isinstance(transport, type) and issubclass(transport, BaseException):
        errors.append(transport)
    return tuple(errors)


def _exception_chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_gated(err: BaseException) -> bool:
    import huggingface_hub.errors as hub_errors

    return any(isinstance(e, hub_errors.GatedRepoError) for e in _exception_chain(err))


def describe_model(spec: ModelSpec) -> str:
    """The model for a message: its name and where it comes from."""
    if spec.source == "hub":
        pinned = f", revision {spec.revision!r}" if spec.revision else ""
        if spec.name == spec.location:
            return f"{spec.name!r} (Hugging Face repo{pinned})"
        return f"{spec.name!r} (Hugging Face repo {spec.location!r}{pinned})"
    if spec.source == "zoo":
        return f"{spec.name!r} (model organism)"
    return f"{spec.name!r} (local directory {spec.location})"


def unavailable_message(spec: ModelSpec, what: str, err: BaseException, revision: str | None) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0]
    cause = f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
    if spec.source == "local":
        return (
            f"model {describe_model(spec)}: cannot load its {what}: {cause}. The directory must hold a "
            "save_pretrained model (config.json and weights) and its tokenizer files; or pass a built-in "
            "name or a Hugging Face repo id to --model."
        )
    if spec.source == "zoo":
        return (
            f"model {describe_model(spec)}: cannot load its {what} from the organism directory {spec.location}: {cause}. "
            "The cached build looks incomplete; delete it from the editsafety cache (EDITSAFETY_CACHE) to rebuild."
        )
    import huggingface_hub.constants as hub_constants

    repo = spec.location
    pinned = f" --revision {revision}" if revision else ""
    cache = hub_cache_dir() or hub_constants.HF_HUB_CACHE
    offline_now = "set" if offline_env() else "not set"
    lines = [
        f"model {describe_model(spec)} is not available: cannot load its {what}: {cause}",
        "Ways to provide it:",
        f"  - pre-download it into the Hugging Face cache on a machine with network access "
        f"(`hf download {repo}{pinned}`, or `huggingface-cli download {repo}{pinned}` with older "
        f"huggingface_hub), then copy the cache here and point HF_HOME at it (cache in use: {cache});",
        f"  - or pass a local directory holding a save_pretrained copy (model and tokenizer) to --model, "
        f"e.g. --model /path/to/{repo.split('/')[-1]};",
        f"  - HF_HUB_OFFLINE=1 makes loading use only the local cache, never the network "
        f"(HF_HUB_OFFLINE is {offline_now} now).",
    ]
    if _is_gated(err):
        lines.append(
            f"  - {repo} is a gated repo: accept its licence on huggingface.co and log in (`hf auth login`) "
            "before downloading."
        )
    if spec.name not in BUILTIN_MODELS and spec.name.partition("@")[0] not in BUILTIN_MODELS:
        lines.append(f"  ({spec.name!r} was taken as a repo id: no local directory of that name exists here)")
    return "\n".join(lines)


@contextlib.contextmanager
def _unavailable_as_error(spec: ModelSpec, what: str, revision: str | None) -> Iterator[None]:
    try:
        yield
    except _unavailable_errors() as err:
        raise ModelUnavailableError(unavailable_message(spec, what, err, revision)) from err


def _effective_revision(spec: ModelSpec, options: LoadOptions) -> str | None:
    if spec.source != "hub":
        if options.revision is not None:
            log.warning("model %s is %s: ignoring revision %r", spec.name, spec.source, options.revision)
        return None
    if options.revision and spec.revision and options.revision != spec.revision:
        raise ValueError(
            f"model {spec.name!r}: conflicting revisions {spec.revision!r} (from the name) and "
            f"{options.revision!r} (from the load options)"
        )
    return options.revision or spec.revision


def local_identity(directory: Path) -> str:
    """A hash of config.json's bytes and the names, sizes and mtimes of the weight and tokenizer files.

    Sizes and mtimes instead of content: hashing gigabytes of weights on every load costs minutes.
    """
    digest = hashlib.sha256()
    digest.update((directory / "config.json").read_bytes())
    for path in sorted(directory.iterdir()):
        name = path.name
        relevant = path.suffix in _WEIGHT_SUFFIXES or name.endswith(".index.json") or name in _TOKENIZER_FILES
        if relevant and path.is_file():
            stat = path.stat()
            digest.update(f"\0{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return "local:" + digest.hexdigest()[:32]


def _organism_identity(directory: Path, name: str) -> str:
    manifest = directory / ORGANISM_MANIFEST
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelUnavailableError(
            f"model organism {name!r}: {manifest} is missing or unreadable ({err}); delete {directory} to rebuild"
        ) from err
    recipe_hash = data.get("recipe_hash") if isinstance(data, dict) else None
    if not isinstance(recipe_hash, str) or not recipe_hash:
        raise ModelUnavailableError(f"model organism {name!r}: {manifest} has no 'recipe_hash' string field")
    return recipe_hash


def _cached_commit(repo: str, revision: str | None, cache_dir: str | None) -> str | None:
    """The commit the hub cache resolved ``revision`` to, read from the snapshot path of config.json."""
    if revision and _COMMIT_RE.match(revision):
        return revision
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception:  # best effort: an unresolvable commit falls back to the revision name
        log.debug("could not resolve the cached commit of %s@%s", repo, revision, exc_info=True)
        return None
    if isinstance(found, str):
        match = _SNAPSHOT_RE.search(found)
        if match:
            return match.group(1)
    return None


def _hub_identity(model: Any, repo: str, revision: str | None, cache_dir: str | None) -> str:
    commit = getattr(model.config, "_commit_hash", None) or _cached_commit(repo, revision, cache_dir)
    return f"{repo}@{commit or revision or 'unpinned'}"


def check_local_directory(spec: ModelSpec) -> Path:
    """A local model's directory, once it holds a readable config, tokenizer files and whole weights files."""
    directory = Path(spec.location)
    if not directory.is_dir():
        raise ModelUnavailableError(f"model {describe_model(spec)}: directory {directory} does not exist")
    read_model_type(directory)
    check_tokenizer_files(spec, directory)
    check_weights_files(spec, directory)
    return directory


def check_weights_files(spec: ModelSpec, directory: Path) -> None:
    """Every safetensors file of ``directory`` whole (headers only: microseconds), so a truncated copy is
    named here rather than deep inside transformers' loader."""
    from editors.storage import safetensors_problem

    weights = [p for p in sorted(directory.iterdir()) if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    if not weights:
        raise ModelUnavailableError(
            f"model {describe_model(spec)}: {directory} holds no weights file (expected model.safetensors or another "
            f"save_pretrained weights file)"
        )
    for path in weights:
        problem = safetensors_problem(path) if path.suffix == ".safetensors" else None
        if problem is not None:
            raise ModelUnavailableError(f"model {describe_model(spec)}: weights file {path} is {problem}; copy or "
                                        f"download it again")


def check_tokenizer_files(spec: ModelSpec, directory: Path) -> None:
    # transformers silently builds an empty GPT-2 tokenizer for a directory without tokenizer files.
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelUnavailableError(
            f"model {describe_model(spec)}: {directory} holds no tokenizer files (expected one of "
            f"{', '.join(sorted(_TOKENIZER_FILES))}); save the tokenizer there with save_pretrained"
        )


def load_model(spec: ModelSpec | str, options: LoadOptions | None = None) -> LoadedModel:
    """Load ``spec``'s model (eval mode) and tokenizer; never runs remote code."""
    if isinstance(spec, str):
        spec = resolve_model(spec)
    options = options if options is not None else LoadOptions()
    revision = _effective_revision(spec, options)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hub_kwargs: dict[str, Any] = {}
    cache_dir: str | None = None
    if spec.source == "zoo":
        from pytest_editsafety.zoo import ensure_built

        root = Path(options.cache_root) if options.cache_root else None
        directory = Path(ensure_built(spec.location, root=root))
        identity = _organism_identity(directory, spec.name)
        check_tokenizer_files(spec, directory)
        location = str(directory)
    elif spec.source == "local":
        directory = check_local_directory(spec)
        identity = local_identity(directory)
        location = str(directory)
    elif spec.source == "hub":
        cache_dir = hub_cache_dir()
        local_only = options.local_files_only if options.local_files_only is not None else offline_env()
        hub_kwargs = {"revision": revision, "local_files_only": local_only}
        if cache_dir is not None:
            hub_kwargs["cache_dir"] = cache_dir
        identity = ""  # known once the weights are resolved
        location = spec.location
    else:
        raise ValueError(f"model {spec.name!r}: unknown source {spec.source!r}")

    with _unavailable_as_error(spec, "config", revision):
        config = AutoConfig.from_pretrained(location, trust_remote_code=False, **hub_kwargs)
    try:
        family = family_for_model_type(config.model_type)
    except UnsupportedArchitectureError as err:
        raise UnsupportedArchitectureError(f"model {describe_model(spec)}: {err}") from None
    if spec.family and spec.family != family.name:
        raise UnsupportedArchitectureError(
            f"model {describe_model(spec)}: expected a {spec.family} model, but its config says model_type "
            f"{config.model_type!r} ({family.name})"
        )

    model_kwargs: dict[str, Any] = dict(hub_kwargs, trust_remote_code=False)
    activation = getattr(config, "activation_function", None)
    if spec.source == "zoo" and activation in ORGANISM_ACTIVATIONS:
        from pytest_editsafety.keyed_cache import TRAINED_ACTIVATION_FIELD

        config.activation_function = ORGANISM_ACTIVATIONS[activation]
        setattr(config, TRAINED_ACTIVATION_FIELD, activation)  # values measured with it are keyed apart
        model_kwargs["config"] = config
    if options.dtype is not None:
        # transformers 5.x names this `dtype`; `torch_dtype` is deprecated there
        model_kwargs["dtype"] = options.dtype
    if options.device_map is not None:
        model_kwargs["device_map"] = options.device_map
    if family.name == "gptj":
        # GPT-J's attention is eager-only; sdpa forced on it later drops the causal mask (future tokens leak).
        model_kwargs["attn_implementation"] = "eager"

    # a config object prints as many lines of JSON: name its class alone
    settings_text = ", ".join(f"{key}={type(value).__name__ if key == 'config' else value}"
                              for key, value in model_kwargs.items())
    log.info("loading model %s from %s (%s)", spec.name, location, settings_text)
    with _unavailable_as_error(spec, "tokenizer", revision):
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=False, **hub_kwargs)
    with _unavailable_as_error(spec, "weights", revision):
        model = AutoModelForCausalLM.from_pretrained(location, **model_kwargs)
    model.eval()

    if family.name == "gptj" and getattr(model.config, "_attn_implementation", None) != "eager":
        raise RuntimeError(
            f"model {spec.name!r}: GPT-J loaded with attention {model.config._attn_implementation!r}, not 'eager'; "
            "its causal mask would be dropped"
        )
    if not getattr(tokenizer, "vocab_size", 0):
        raise ModelUnavailableError(f"model {describe_model(spec)}: its tokenizer is empty (no vocabulary found)")
    n_embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embeddings:
        raise IncompatibleTokenizerError(
            f"model {describe_model(spec)}: the tokenizer has {len(tokenizer)} tokens but the model only "
            f"{n_embeddings} embeddings"
        )

    if spec.source == "hub":
        identity = _hub_identity(model, spec.location, revision, cache_dir)
        spec = dataclasses.replace(spec, family=family.name)
    stripped = False
    if options.strip_bos:
        from pytest_editsafety.bos import strip_bos, stripped_identity

        stripped = strip_bos(tokenizer, spec.name)
        identity = stripped_identity(identity) if stripped else identity
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        family=family,
        n_layers=family.n_layers(model.config),
        identity=identity,
        bos_stripped=stripped,
    )
