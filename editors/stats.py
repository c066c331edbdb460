"""Second-moment statistics ``C = E[k kᵀ]`` of the MLP output projection's inputs, per (model, layer).

Three jobs, kept apart:

- :func:`compute_second_moment` streams a corpus through the model in batches of a token budget and
  accumulates the keys of every non-pad token (hooks + maths, no I/O);
- :class:`SecondMomentCache` stores one statistic per :class:`StatsKey` as a safetensors file under the
  project's cache root, computed once across processes (a file lock plus an atomic rename); each file records
  the sha256 of its tensor's bytes, checked on every read: a file that fails the check (or predates it) is
  reported by name, discarded and rebuilt;
- :func:`load_rome_npz` / :func:`find_rome_stats` read the ``.npz`` files that ROME's and MEMIT's code
  writes (and that GPU users already have), never unpickling anything.

:func:`covariance_for` ties them together for the editors: a ROME file when the user points to one,
the cache otherwise, refusing a ``C`` too poorly sampled or conditioned to solve with
(:mod:`editors.maths.moments` measures it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from editors.hooks import eval_mode, input_of
from editors.progress import ThrottledProgress
from editors.maths.moments import (
    WELL_SAMPLED_TOKENS_PER_DIM,
    SecondMomentQuality,
    assess_second_moment,
    second_moment_concerns,
    second_moment_problems,
)
from editors.maths.rome import SecondMomentAccumulator
from editors.storage import build_lock, stable_hash
from editors.text import pad_id, padded, pads_left

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "DEFAULT_BATCH_TOKENS",
    "IllPosedStatsError",
    "ROME_COUNT_KEY",
    "ROME_MOM2_KEY",
    "RomeStatsError",
    "SecondMomentCache",
    "SecondMomentEntry",
    "StatsCacheError",
    "StatsError",
    "StatsIntegrityError",
    "StatsKey",
    "compute_second_moment",
    "covariance_for",
    "find_rome_stats",
    "load_rome_npz",
    "payload_sha256",
    "read_entry",
    "rome_stats_filename",
    "token_batches",
    "write_entry",
]

# Bumped whenever what a cache file means changes, so old files get new names instead of being misread. Adding
# the payload digest did not change the meaning: files without one keep their name and are rebuilt in place.
CACHE_FORMAT = "pytest-editsafety/second-moment/1"
_TENSOR_NAME = "C"
_DIGEST_FIELD = "payload_sha256"
# Padded tokens per forward pass of the statistics pass: 64 texts of 128 tokens. ROME's layer_stats packs
# 3 x n_positions tokens (3,072 for GPT-2); a larger budget only helps an accelerator stay busy, and GPT-2-XL's
# activations at 8,192 tokens stay well under a gigabyte.
DEFAULT_BATCH_TOKENS = 8192
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# ROME's statistics code (kmeng01/rome, rome/layer_stats.py and util/runningstats.py; MEMIT reuses it)
# gathers its stats in a combined-statistics object whose state dict prefixes each member's fields with
# the member's name and a dot, and saves that dict with numpy.savez. The second-moment member is called
# "mom2" and keeps the running sum of k kᵀ under "mom2" and the number of keys under "count", hence the
# two keys below; the moment ROME uses is that sum divided by the count. The archive also holds a
# "mom2.constructor" string, a top-level "sample_size", and, when means were collected too, "mean.*"
# entries; ROME encodes None as a tagged NaN rather than pickling, so the arrays load without pickle.
ROME_MOM2_KEY = "mom2.mom2"
ROME_COUNT_KEY = "mom2.count"


class StatsError(ValueError):
    """A second-moment statistic cannot be computed, stored or read."""


class StatsCacheError(StatsError):
    """A cached statistics file is unreadable or belongs to another key; the message names the file."""


class StatsIntegrityError(StatsCacheError):
    """A cached statistics file's tensor differs from the digest recorded when it was written, or the file
    records none (written before digests were); the message names the file."""


class RomeStatsError(StatsError):
    """A ROME ``.npz`` statistics file is missing, malformed or of the wrong shape; names the file."""


class IllPosedStatsError(StatsError):
    """A second moment too poorly sampled or conditioned to solve with; the message gives the numbers."""


# --------------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True)
class StatsKey:
    """Everything a cached ``C`` depends on; two statistics share a file only when all fields agree."""

    model_identity: str
    layer: int
    module: str
    n_samples: int
    corpus: str
    max_length: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("model_identity", "module", "corpus"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise StatsError(f"StatsKey.{name}: expected a non-empty string, got {value!r}")
        for name, minimum in (("layer", 0), ("n_samples", 1), ("max_length", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise StatsError(f"StatsKey.{name}: expected an integer >= {minimum}, got {value!r}")
        if self.dtype not in _DTYPES:
            raise StatsError(f"StatsKey.dtype: expected one of {', '.join(_DTYPES)}, got {self.dtype!r}")

    def fields(self) -> dict[str, str]:
        """The key as strings: what a cache file's metadata must repeat exactly."""
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def digest(self) -> str:
        return stable_hash({"format": CACHE_FORMAT, **dataclasses.asdict(self)})

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


# --------------------------------------------------------------------------------------------------
# Computing C over a corpus


def token_batches(lengths: Sequence[int], batch_tokens: int, *, max_texts: int | None = None) -> list[list[int]]:
    """Indices of texts grouped so that each batch's padded size (texts x longest text) is at most
    ``batch_tokens``, and at most ``max_texts`` texts when given; a text longer than the budget goes alone.

    Texts are taken longest first, so similar lengths share a batch (little padding) and the largest batch
    comes first (a budget too large for the device fails at once, not at the end of a long pass).
    """
    if batch_tokens < 1:
        raise StatsError(f"batch_tokens: expected >= 1, got {batch_tokens}")
    if max_texts is not None and max_texts < 1:
        raise StatsError(f"batch_size: expected >= 1, got {max_texts}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        new_width = max(width, lengths[i], 1)
        if current and (new_width * (len(current) + 1) > batch_tokens
                        or (max_texts is not None and len(current) >= max_texts)):
            batches.append(current)
            current, new_width = [], max(lengths[i], 1)
        current.append(i)
        width = new_width
    if current:
        batches.append(current)
    return batches


def compute_second_moment(
    model: torch.nn.Module,
    tokenizer: Any,
    family: Any,
    layer: int,
    texts: Sequence[str],
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    batch_size: int | None = None,
    max_length: int = 128,
    progress: bool | Callable[[str], None] = True,
) -> tuple[Tensor, int]:
    """``(C, n)``: the float32 ``E[k kᵀ]`` over the keys of every non-pad token of ``texts``, and ``n``.

    Keys are the inputs of ``family.layer_name("mlp_out", layer)``. Each text is truncated to
    ``max_length`` tokens (special tokens included, as the tokenizer adds them). The texts are tokenized
    first, then run in batches of at most ``batch_tokens`` padded tokens (and at most ``batch_size`` texts
    when given, see :func:`token_batches`); the progress bar counts tokens against the known total, so its
    ETA holds however the lengths vary (``progress`` a function of one line: lines of text every few seconds
    instead, :class:`editors.progress.ThrottledProgress`). Padding follows the tokenizer's ``padding_side`` and
    position ids are derived from the attention mask, so neither the batching nor the padding side changes the
    result beyond rounding. The model runs in eval mode without gradients and gets its train/eval flags back
    afterwards.
    """
    from tqdm.auto import tqdm

    if max_length < 1:
        raise StatsError(f"max_length: expected >= 1, got {max_length}")
    texts = list(texts)
    if not texts:
        raise StatsError("texts: need at least one text to estimate a second moment")
    module_name = family.layer_name("mlp_out", layer)
    module = family.get_module(model, module_name)
    device = next(model.parameters()).device
    # int32 arrays rather than lists of Python ints: 100,000 texts of 128 tokens take 51 MB instead of ~0.5 GB
    token_ids: list[np.ndarray] = []
    for start in range(0, len(texts), 1024):
        encoded = tokenizer(texts[start : start + 1024], truncation=True, max_length=max_length)["input_ids"]
        token_ids.extend(np.asarray(ids, dtype=np.int32) for ids in encoded)
    lengths = [len(ids) for ids in token_ids]
    batches = token_batches(lengths, batch_tokens, max_texts=batch_size)
    accumulator: SecondMomentAccumulator | None = None
    with eval_mode(model), torch.no_grad():
        bar = tqdm(total=sum(lengths), desc=f"E[kkᵀ] {module_name}", unit="tok", unit_scale=True,
                   disable=progress is not True)
        lines = ThrottledProgress(f"C = E[kkᵀ] at {module_name}", sum(lengths), "tokens",
                                  progress if callable(progress) else lambda line: None)
        try:
            for batch in batches:
                ids, mask = padded([token_ids[i].tolist() for i in batch], pad_id(tokenizer), left=pads_left(tokenizer))
                ids, mask = ids.to(device), mask.to(device)
                if bool(mask.any()):
                    # left padding would otherwise shift every real token's position
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    # the pass stops at the module: the layers above it are not needed for the statistic
                    inputs = input_of(model, module, input_ids=ids, attention_mask=mask, position_ids=positions)
                    if inputs is None:
                        raise StatsError(f"module {module_name!r} was not called during the forward pass")
                    # boolean selection, not multiplication by the mask: a pad row may hold non-finite values
                    keys = inputs[mask.bool()]
                    if accumulator is None:
                        accumulator = SecondMomentAccumulator(keys.shape[-1], device=keys.device)
                    accumulator.update(keys)
                bar.update(sum(lengths[i] for i in batch))
                lines.advance(sum(lengths[i] for i in batch))
        finally:
            bar.close()
        lines.finish()
    if accumulator is None or accumulator.count == 0:
        raise StatsError(f"texts: the {len(texts)} texts produced no tokens, so there are no keys to average")
    return accumulator.mean(dtype=torch.float32).cpu(), accumulator.count


# --------------------------------------------------------------------------------------------------
# The safetensors cache


@dataclass(frozen=True, eq=False)
class SecondMomentEntry:
    """A stored statistic: ``covariance`` in the key's dtype (shared; do not modify it in place), the number of
    keys behind it, and its rank and conditioning when they were measured (None for files written without)."""

    covariance: Tensor
    token_count: int
    path: Path
    quality: SecondMomentQuality | None = None


def payload_sha256(tensor: Tensor) -> str:
    """sha256 of ``tensor``'s bytes as stored (contiguous, on the CPU), whatever its dtype."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def write_entry(path: Path, key: StatsKey, covariance: Tensor, token_count: int,
                quality: SecondMomentQuality | None = None) -> None:
    """Write ``covariance`` for ``key`` to ``path`` atomically (a temporary sibling, then a rename), with the
    sha256 of its bytes and, when given, ``quality``'s numbers in the metadata.

    Takes no lock: :meth:`SecondMomentCache.get` holds the build lock around it.
    """
    from safetensors.torch import save_file

    if covariance.dim() != 2 or covariance.shape[0] != covariance.shape[1]:
        raise StatsError(f"covariance for {path}: expected a square matrix, got shape {tuple(covariance.shape)}")
    if not isinstance(token_count, int) or isinstance(token_count, bool) or token_count < 1:
        raise StatsError(f"token_count for {path}: expected a positive integer, got {token_count!r}")
    tensor = covariance.detach().to(device="cpu", dtype=key.torch_dtype).contiguous()
    metadata = {"format": CACHE_FORMAT, "token_count": str(token_count), **key.fields(),
                _DIGEST_FIELD: payload_sha256(tensor), **(quality.as_metadata() if quality is not None else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file({_TENSOR_NAME: tensor}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_entry(path: Path, key: StatsKey) -> SecondMomentEntry:
    """Load ``path``, check that it is the statistic of ``key`` and that its tensor is the one written (the
    recorded sha256); any doubt is a :class:`StatsCacheError` (:class:`StatsIntegrityError` for the digest)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = list(handle.keys())
            if names != [_TENSOR_NAME]:
                raise StatsCacheError(
                    f"statistics file {path}: expected exactly one tensor {_TENSOR_NAME!r}, found {names}"
                )
            covariance = handle.get_tensor(_TENSOR_NAME)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        if isinstance(err, StatsCacheError):
            raise
        raise StatsCacheError(
            f"statistics file {path} is unreadable or corrupted ({err}); delete it to recompute"
        ) from err
    expected = {"format": CACHE_FORMAT, **key.fields()}
    wrong = {name: metadata.get(name) for name, value in expected.items() if metadata.get(name) != value}
    if wrong:
        details = "; ".join(f"{name}: file has {got!r}, key has {expected[name]!r}" for name, got in wrong.items())
        raise StatsCacheError(f"statistics file {path} does not belong to this key ({details})")
    try:
        token_count = int(metadata.get("token_count", ""))
    except ValueError:
        token_count = 0
    if token_count < 1:
        raise StatsCacheError(
            f"statistics file {path}: metadata token_count {metadata.get('token_count')!r} is not a positive integer"
        )
    if covariance.dim() != 2 or covariance.shape[0] != covariance.shape[1] or covariance.dtype != key.torch_dtype:
        raise StatsCacheError(
            f"statistics file {path}: expected a square {key.dtype} matrix, got shape "
            f"{tuple(covariance.shape)} and dtype {covariance.dtype}"
        )
    recorded = metadata.get(_DIGEST_FIELD)
    if recorded is None:
        raise StatsIntegrityError(f"statistics file {path} records no {_DIGEST_FIELD} (written before cache files "
                                  f"carried a digest), so its values cannot be verified")
    actual = payload_sha256(covariance)
    if actual != recorded:
        raise StatsIntegrityError(f"statistics file {path}: the tensor's sha256 is {actual}, but the file recorded "
                                  f"{recorded} when it was written; its values changed on disk")
    quality = SecondMomentQuality.from_metadata(metadata, dim=covariance.shape[0], token_count=token_count)
    return SecondMomentEntry(covariance=covariance, token_count=token_count, path=path, quality=quality)


Assess = Callable[[Tensor, int], SecondMomentQuality]


class SecondMomentCache:
    """Second moments on disk under ``root`` (the owner's choice, e.g. ``<cache root>/stats``), plus what this
    instance has already loaded, so repeated edits in one process read each file once."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._entries: dict[str, SecondMomentEntry] = {}
        self._rome: dict[tuple[str, int, int], SecondMomentEntry] = {}
        self._qualities: dict[tuple[str, int], SecondMomentQuality] = {}

    def path_for(self, key: StatsKey) -> Path:
        # the module name is only there for people browsing the cache; the digest carries the identity
        return self.root / f"{key.module}-L{key.layer}-{key.digest()}.safetensors"

    def get(self, key: StatsKey, compute: Callable[[], tuple[Tensor, int]]) -> Tensor:
        """``C`` for ``key``: from memory, else from its file, else ``compute()`` once across processes."""
        return self.get_entry(key, compute).covariance

    def get_entry(self, key: StatsKey, compute: Callable[[], tuple[Tensor, int]], *,
                  assess: Assess | None = None) -> SecondMomentEntry:
        """As :meth:`get`, with the token count; ``assess(C, n)``, when given, measures a freshly computed
        statistic and its numbers are stored with it. A file that does not verify (another key, a changed
        tensor, no digest) is named in a warning, discarded and rebuilt."""
        digest = key.digest()
        entry = self._entries.get(digest)
        if entry is not None:
            return entry
        path = self.path_for(key)
        entry = self._read_or_discard(path, key, locked=False)
        if entry is None:
            with build_lock(path):
                # another process may have finished it, or discarded a bad file, while we waited for the lock
                entry = self._read_or_discard(path, key, locked=True)
                if entry is not None:
                    log.info("reusing statistics %s written by another process", path)
                else:
                    log.info("computing second moment for %s layer %d into %s", key.model_identity, key.layer, path)
                    covariance, token_count = compute()
                    quality = assess(covariance, token_count) if assess is not None else None
                    write_entry(path, key, covariance, token_count, quality)
                    # read back what is on disk, so this process and every later one use identical values
                    entry = read_entry(path, key)
        self._entries[digest] = entry
        return entry

    @staticmethod
    def _read_or_discard(path: Path, key: StatsKey, *, locked: bool) -> SecondMomentEntry | None:
        """The entry at ``path``; None when there is none, or (holding the lock) when it failed verification
        and was deleted. Without the lock a bad file is left for the locked pass, so two processes never
        delete each other's fresh files."""
        if not path.exists():
            return None
        try:
            return read_entry(path, key)
        except StatsCacheError as err:
            if not locked:
                return None
            log.warning("discarding statistics file %s and computing it again: %s", path, err)
            path.unlink(missing_ok=True)
            return None

    def get_rome(self, path: Path) -> Tensor:
        """:func:`load_rome_npz`, remembered per file (and its size and mtime) for this instance."""
        return self.get_rome_entry(path).covariance

    def get_rome_entry(self, path: Path) -> SecondMomentEntry:
        """A ROME file's ``C`` with its key count (``mom2.count``), remembered per file, size and mtime."""
        path = Path(path)
        try:
            st = path.stat()
        except OSError as err:
            raise RomeStatsError(f"ROME statistics file {path} cannot be read ({err})") from err
        memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if memo_key not in self._rome:
            covariance, count = _load_rome(path)
            self._rome[memo_key] = SecondMomentEntry(covariance=covariance, token_count=count, path=path)
        return self._rome[memo_key]

    def quality(self, entry: SecondMomentEntry, assess: Assess) -> SecondMomentQuality:
        """``entry``'s rank and conditioning: as stored with it, else ``assess``-ed once per file for this
        instance (ROME's files and cache files written without the numbers)."""
        if entry.quality is not None:
            return entry.quality
        memo_key = (str(entry.path), entry.token_count)
        if memo_key not in self._qualities:
            self._qualities[memo_key] = assess(entry.covariance, entry.token_count)
        return self._qualities[memo_key]


# --------------------------------------------------------------------------------------------------
# ROME's published statistics


def rome_stats_filename(module_name: str, *, sample_size: int | None = 100000, precision: str = "float32") -> str:
    """The file name ROME's code gives a second-moment file: ``<module>_<precision>_mom2[_<samples>].npz``.

    ROME leaves the sample-count suffix off when it used the whole dataset (``sample_size=None``).
    """
    suffix = "" if sample_size is None else f"_{sample_size}"
    return f"{module_name}_{precision}_mom2{suffix}.npz"


def find_rome_stats(
    stats_dir: str | os.PathLike[str],
    model_name: str,
    module_name: str,
    *,
    sample_size: int | None = 100000,
    precision: str = "float32",
    dataset: str = "wikipedia",
) -> Path | None:
    """The ROME statistics file for ``module_name`` of ``model_name`` under ``stats_dir``, or None.

    ROME's layout is ``<stats_dir>/<model>/<dataset>_stats/<file>``, where ``<model>`` is the hub id with
    "/" turned into "_" (``gpt2-xl``, ``EleutherAI_gpt-j-6B``); a file of the same name directly in
    ``stats_dir`` is accepted too, for users who collected the files by hand.
    """
    root = Path(stats_dir).expanduser()
    if not root.is_dir():
        raise RomeStatsError(f"statistics directory {root} does not exist or is not a directory")
    filename = rome_stats_filename(module_name, sample_size=sample_size, precision=precision)
    candidates = (root / model_name.replace("/", "_") / f"{dataset}_stats" / filename, root / filename)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def load_rome_npz(path: str | os.PathLike[str]) -> Tensor:
    """``C = mom2.mom2 / mom2.count`` from a ROME statistics ``.npz``, as float32, never unpickling."""
    return _load_rome(Path(path))[0]


def _load_rome(path: Path) -> tuple[Tensor, int]:
    """``(C, count)`` from a ROME statistics ``.npz``; :func:`load_rome_npz` without dropping the count."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise RomeStatsError(f"ROME statistics file {path} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise RomeStatsError(f"ROME statistics file {path} is not a readable .npz archive ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise RomeStatsError(f"ROME statistics file {path} holds a single array, expected an .npz archive")
    with archive:
        present = sorted(archive.files)
        mom2 = _npz_array(archive, path, ROME_MOM2_KEY, present)
        count = _npz_array(archive, path, ROME_COUNT_KEY, present)
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1] or mom2.shape[0] == 0:
        raise RomeStatsError(
            f"ROME statistics file {path}: {ROME_MOM2_KEY!r} must be a square matrix, got shape {mom2.shape}"
        )
    if mom2.dtype.kind != "f":
        raise RomeStatsError(f"ROME statistics file {path}: {ROME_MOM2_KEY!r} must be floating point, got {mom2.dtype}")
    if count.size != 1 or count.dtype.kind not in "iuf":
        raise RomeStatsError(
            f"ROME statistics file {path}: {ROME_COUNT_KEY!r} must be a single number, got shape {count.shape} "
            f"and dtype {count.dtype}"
        )
    n = float(count.reshape(()))
    if not math.isfinite(n) or n <= 0:
        raise RomeStatsError(f"ROME statistics file {path}: {ROME_COUNT_KEY!r} must be positive, got {n}")
    if not np.isfinite(mom2).all():
        raise RomeStatsError(f"ROME statistics file {path}: {ROME_MOM2_KEY!r} has non-finite entries")
    return torch.from_numpy(mom2.astype(np.float64) / n).to(torch.float32), int(round(n))


def _npz_array(archive: Any, path: Path, name: str, present: list[str]) -> np.ndarray:
    if name not in present:
        raise RomeStatsError(f"ROME statistics file {path}: missing key {name!r} (keys present: {present})")
    try:
        return archive[name]
    except ValueError as err:
        # numpy refuses object arrays when allow_pickle is False; that refusal is the point
        raise RomeStatsError(
            f"ROME statistics file {path}: key {name!r} cannot be read without unpickling ({err})"
        ) from err


# --------------------------------------------------------------------------------------------------
# What the editors call


def _in_features(module: Any, transposed: bool) -> int | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    return int(weight.shape[0] if transposed else weight.shape[1])


def covariance_for(
    model: torch.nn.Module,
    tokenizer: Any,
    family: Any,
    layer: int,
    *,
    identity: str,
    corpus: Any,
    cache: SecondMomentCache,
    stats_dir: str | os.PathLike[str] | None = None,
    rome_model_name: str | None = None,
    n_samples: int = 100000,
    max_length: int = 128,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    batch_size: int | None = None,
    dtype: str = "float32",
    progress: bool | Callable[[str], None] = True,
    check: bool = True,
    described: Callable[[str], None] | None = None,
) -> Tensor:
    """``C`` for the MLP output projection of ``layer``: a ROME ``.npz`` when ``stats_dir`` holds one,
    else the cached statistic over the first ``n_samples`` texts of ``corpus``; ``described`` is handed one line
    saying which (the file, or the corpus, its hash and the texts and keys behind C), for a certificate.

    ``corpus`` is any object with ``texts``, ``name`` and ``sha256`` (the corpus loaders' ``Corpus``), or a
    callable returning one, called only when no ROME file answers (so a run on ROME's files needs no corpus).
    ``identity`` names the weights (an organism recipe hash, ``repo@commit``); the model's parameter dtype
    is added to it, since keys computed in half precision differ. ``rome_model_name`` defaults to the
    model's ``name_or_path``, which is how ROME names its directories. With ``check`` (the default) a ``C``
    that :func:`editors.maths.moments.second_moment_problems` finds ill-posed is an :class:`IllPosedStatsError`
    giving the numbers; the measurement runs on the model's device and is stored with a computed statistic.
    """
    module_name = family.layer_name("mlp_out", layer)
    module = family.get_module(model, module_name)
    d_in = _in_features(module, bool(getattr(family, "weight_transposed", False)))
    parameter = next(model.parameters())

    def assess(covariance: Tensor, token_count: int) -> SecondMomentQuality:
        return assess_second_moment(covariance.to(parameter.device), token_count)

    if stats_dir is not None:
        config = model.config
        name = rome_model_name or getattr(config, "name_or_path", "") or getattr(config, "_name_or_path", "")
        if not name:
            raise RomeStatsError(
                f"stats_dir {stats_dir} was given but the model has no name_or_path: pass rome_model_name"
            )
        found = find_rome_stats(stats_dir, name, module_name, sample_size=n_samples)
        if found is not None:
            entry = cache.get_rome_entry(found)
            if d_in is not None and entry.covariance.shape[0] != d_in:
                raise RomeStatsError(
                    f"ROME statistics file {found}: a {entry.covariance.shape[0]}x{entry.covariance.shape[1]} "
                    f"matrix, but {module_name} takes {d_in} inputs; the file belongs to another model or layer"
                )
            if check:
                _refuse_ill_posed(cache.quality(entry, assess), f"ROME statistics file {found}", module_name,
                                  "use the statistics of a larger sample")
            log.info("using ROME statistics %s for %s", found, module_name)
            if described is not None:
                described(f"ROME statistics file {Path(found).name} ({entry.token_count} keys)")
            return entry.covariance
        log.warning(
            "no ROME statistics for %s of %s under %s (looked for %s); computing them instead",
            module_name, name, stats_dir, rome_stats_filename(module_name, sample_size=n_samples),
        )
    if n_samples < 1:
        raise StatsError(f"n_samples: expected >= 1, got {n_samples}")
    if callable(corpus) and not hasattr(corpus, "texts"):
        corpus = corpus()
    texts = tuple(corpus.texts)
    # the effective count, so asking for 100000 texts of a 3000-text corpus shares the file of asking for 3000
    used = min(n_samples, len(texts))
    if used < n_samples:
        log.info("statistics corpus %s holds %d texts, fewer than the %d asked for (mom2_n_samples); using all",
                 corpus.name, len(texts), n_samples)
    param_dtype = str(parameter.dtype).removeprefix("torch.")
    key = StatsKey(
        model_identity=f"{identity}|{param_dtype}",
        layer=layer,
        module=module_name,
        dtype=dtype,
        n_samples=used,
        corpus=f"{corpus.name}:{corpus.sha256}",
        max_length=max_length,
    )

    def compute() -> tuple[Tensor, int]:
        return compute_second_moment(
            model, tokenizer, family, layer, texts[:used],
            batch_tokens=batch_tokens, batch_size=batch_size, max_length=max_length, progress=progress,
        )

    entry = cache.get_entry(key, compute, assess=assess if check else None)
    covariance = entry.covariance
    if d_in is not None and covariance.shape[0] != d_in:
        raise StatsCacheError(
            f"statistics file {cache.path_for(key)}: a {covariance.shape[0]}x{covariance.shape[1]} matrix, but "
            f"{module_name} takes {d_in} inputs"
        )
    if check:
        _refuse_ill_posed(cache.quality(entry, assess), f"C over {used} texts of corpus {corpus.name!r} "
                          f"(statistics file {entry.path})", module_name,
                          f"raise mom2_n_samples (now {n_samples}) in the editor's hparams, give a larger "
                          f"--editsafety-stats-corpus")
    if described is not None:
        described(f"{corpus.name} (sha256 {corpus.sha256[:12]}, {used} texts, {entry.token_count} keys)")
    return covariance


def _refuse_ill_posed(quality: SecondMomentQuality, source: str, module_name: str, remedy: str) -> None:
    problems = second_moment_problems(quality)
    if problems:
        raise IllPosedStatsError(
            f"{source} for {module_name} is too poor to solve with ({quality.describe()}): {'; '.join(problems)}. "
            f"To fix: {remedy}, point --editsafety-stats-dir at ROME's statistics files, or turn mom2_adjustment "
            f"off (C = I)"
        )
    concerns = second_moment_concerns(quality)
    if concerns:
        log.warning("%s for %s (%s): %s; the sample is large enough, so this is the model's own key space "
                    "(e.g. neurons that never fire), and solves with C are unreliable along it unless the editor "
                    "regularises C (ROME: mom2_ridge)", source,
                    module_name, quality.describe(), "; ".join(concerns))
    elif not quality.well_sampled:
        log.warning("%s for %s: %s; at least %d tokens per dimension are advised", source, module_name,
                    quality.describe(), WELL_SAMPLED_TOKENS_PER_DIM)
