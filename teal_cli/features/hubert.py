"""Frozen HuBERT features (through transformers' ``HubertModel``), 50 frames per second.

Names: ``hubert-base-ls960`` (layer 6 or 9 in textlesslib's units), ``hubert-large-ll60k``,
``hubert-large-ls960-ft``, ``mhubert-147``; or ``--checkpoint`` a local Hugging Face folder
or a hub repo id. No fairseq needed: Hugging Face's HuBERT checkpoints are the fairseq
weights converted.

Layer convention: ``layer=N`` is the output of transformer layer N counted from 1, the
tensor fairseq's ``extract_features(output_layer=N)`` returns and transformers 5's
``hidden_states[N]``. For the large ("stable layer norm") models the last layer differs from
``last_hidden_state``, which has the final layer norm applied (transformers 4 put that normed
tensor in ``hidden_states[-1]``). ``layer=0`` is the transformer's input; ``layer="final"`` is
``last_hidden_state``. Layers after N are never run.

Normalisation: the waveform is standardised per file (zero mean, unit variance) exactly when
the checkpoint was trained that way: fairseq's ``task.normalize``, true for the large models
(layer-norm feature extractor) and false for the base ones (group norm). ``normalize=`` overrides.
Files longer than 100 s go through the model in consecutive 100 s chunks, as fairseq's
HuBERT feature reader does, so memory stays bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CodecError, UsageError, first_line
from .base import FeatureExtractor, check_layer

if TYPE_CHECKING:
    import torch

# teal name -> Hugging Face repo id
HUBERT_MODELS: dict[str, str] = {
    "hubert-base-ls960": "facebook/hubert-base-ls960",
    "hubert-large-ll60k": "facebook/hubert-large-ll60k",
    "hubert-large-ls960-ft": "facebook/hubert-large-ls960-ft",
    "hubert-xlarge-ll60k": "facebook/hubert-xlarge-ll60k",
    "mhubert-147": "utter-project/mHuBERT-147",
}
MAX_CHUNK = 1_600_000  # samples (100 s at 16 kHz), fairseq's HubertFeatureReader default
_EPS = 1e-7  # Hugging Face's Wav2Vec2FeatureExtractor zero_mean_unit_var_norm


def _locate(source: str, option: str = "--checkpoint") -> tuple[Path, str, list[Path]]:
    """``(absolute folder, "huggingface", weight files)`` for a folder or hub repo id; checks
    the config's model type and that every weight file (shard) is there, reads no weights."""
    from ..weights.reader import hf_weight_files, read_json

    path = Path(source).expanduser()
    if not path.exists():
        if "/" in source and not source.startswith((".", "/", "~")):
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
            except Exception as exc:  # noqa: BLE001 - offline / unknown repo: one clear message
                raise CodecError(f"{source}: cannot get it from the Hugging Face hub ({type(exc).__name__}); "
                                 "download the repository and pass its folder with --checkpoint") from None
        else:
            raise UsageError(f"{option} {source}: no such folder")
    path = path.resolve()
    if not path.is_dir():
        raise CodecError(f"{path}: not a Hugging Face model folder (a file; pass the folder that holds config.json)")
    config = read_json(path / "config.json", "Hugging Face config")
    if config.get("model_type") != "hubert":
        raise CodecError(f"{path / 'config.json'}: model_type is {config.get('model_type')!r}, not 'hubert'")
    return path, "huggingface", hf_weight_files(path)


def _checkpoint_names(name: str) -> str:
    """A checkpoint tensor name as ``HubertModel.state_dict()`` spells it (the ``hubert.``
    prefix of ``HubertForCTC`` files dropped, legacy weight-norm names renamed)."""
    name = name.removeprefix("hubert.")
    return name.replace(".weight_g", ".parametrizations.weight.original0").replace(
        ".weight_v", ".parametrizations.weight.original1")


def _check_weights(folder: Path, files: list[Path]):
    """The HubertConfig of ``folder``, after checking its weight files against it: every
    file readable (safetensors headers against file sizes, torch pickles unpickled safely),
    every shape what the config asks for, every tensor the model needs present. transformers
    would otherwise fill missing tensors with random values (a warning only) and end a
    size mismatch in a multi-line traceback."""
    import torch
    import transformers

    from ..weights.reader import check_shapes, read_json, read_torch, safetensors_header, tensor_refs

    config_path = folder / "config.json"
    try:
        config = transformers.HubertConfig.from_dict(read_json(config_path, "Hugging Face config"))
        with torch.device("meta"):
            expected = transformers.HubertModel(config).state_dict()
    except CodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' own checks of a config: one line naming it
        raise CodecError(f"{config_path}: transformers cannot build a HuBERT from this config "
                         f"({first_line(exc, 160)})") from None
    found: set[str] = set()
    for file in files:
        if file.suffix == ".safetensors":
            shapes = {k: shape for k, (_, shape) in safetensors_header(file).items()}
        else:
            root = read_torch(file)
            shapes = {k: tuple(v.shape) for k, v in tensor_refs(root if isinstance(root, dict) else {}).items()}
        named = {_checkpoint_names(k): v for k, v in shapes.items()}
        check_shapes(expected, named, file, missing_ok=True, unexpected_ok=True,
                     hint=f"{config_path.name} describes another model")
        found.update(named)
    missing = sorted(set(expected) - found - {"masked_spec_embed"})
    if missing:
        raise CodecError(f"{folder}: the weights lack {len(missing)} tensor(s) its config.json asks for "
                         f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): a config/weights mismatch "
                         "or an incomplete download")
    return config


def _load_model(source: str, located: tuple[Path, str, list[Path]] | None = None):
    """(HubertModel, local folder, weight files) for a folder or hub repo id."""
    import transformers

    path, _, files = located or _locate(source)
    _check_weights(path, files)
    try:
        model = transformers.HubertModel.from_pretrained(str(path), use_safetensors=files[0].suffix == ".safetensors")
    except Exception as exc:  # noqa: BLE001 - anything the checks above did not foresee: one line naming the folder
        raise CodecError(f"{path}: transformers cannot load this HuBERT checkpoint ({first_line(exc, 160)})") from None
    return model.eval().requires_grad_(False), path, files


class HubertFeatures(FeatureExtractor):
    """Hidden states of a frozen HuBERT, 50 Hz (``(samples - 400) // 320 + 1`` frames)."""

    kind = "hubert"
    modality = "audio"
    sample_rate = 16000
    frame_rate = 50.0

    def __init__(self, model, name: str, layer: int | str | None, *, sha256: str = "", checkpoint: str = "",
                 normalize: bool | None = None, dtype: str | None = None, device: str | None = None,
                 batch_size: int | None = None):
        from ..runtime.device import resolve_device

        self.model = model
        self.model_name = name
        cfg = model.config
        self.depth = cfg.num_hidden_layers
        self.layer = _check_layer(layer, self.depth, name)
        self.sha256 = sha256
        self.checkpoint = checkpoint
        self.dim = cfg.hidden_size
        self.stable_layer_norm = bool(cfg.do_stable_layer_norm)
        self.normalize = (cfg.feat_extract_norm == "layer") if normalize is None else bool(normalize)
        # Group-norm extractors (base models) normalise the first conv layer over the whole
        # clip, so that layer runs clip by clip and the rest of the model in batches
        # (:meth:`_forward`); layer-norm ones (large) batch from the waveform on.
        self.group_norm = cfg.feat_extract_norm == "group"
        self._after_first = None  # the feature encoder's conv layers after the first (_forward)
        self.batch_size = batch_size
        self.dtype_spec = dtype
        if self.layer != "final":
            # Run only what layer N needs: drop later layers, keep the output of layer N.
            del model.encoder.layers[self.layer :]
            if self.stable_layer_norm:
                import torch

                model.encoder.layer_norm = torch.nn.Identity()
        self.to(resolve_device(device or "cpu"))

    @classmethod
    def from_name(cls, name: str, layer: int | str | None = None, checkpoint: str | None = None,
                  normalize: bool | None = None, dtype: str | None = None, device: str | None = None,
                  batch_size: int | None = None, *, located: tuple | None = None, **_: Any) -> "HubertFeatures":
        from ..weights.digests import files_sha256

        source = checkpoint
        if source is None:
            repo = HUBERT_MODELS.get(name.lower())
            if repo is None:
                raise UsageError(f"--features {name}: unknown HuBERT model; known: {', '.join(HUBERT_MODELS)} "
                                 "(or pass --checkpoint with a Hugging Face folder or repo id)")
            source = repo
        model, folder, files = _load_model(source, located)
        display = name if name.lower() in HUBERT_MODELS else _display_name(folder, source)
        return cls(model, display, layer, sha256=files_sha256(files), checkpoint=str(folder), normalize=normalize,
                   dtype=dtype, device=device, batch_size=batch_size)

    @classmethod
    def from_config(cls, config: dict[str, Any], *, checkpoint: str | None = None, codec_dir: Path | None = None,
                    **overrides: Any) -> "HubertFeatures":
        """Rebuild from a codec's ``features`` block: ``checkpoint`` when given, else the recorded
        folder (absolute, or relative to ``codec_dir``) when its sha256 is the recorded one, else
        the named model from the Hugging Face hub (cache); the sha256 must match either way."""
        from ..weights.digests import files_sha256
        from .base import find_recorded

        model = config.get("model")
        if not isinstance(model, str) or not model:
            raise CodecError(f"{codec_dir or 'codec'}: features block has no HuBERT 'model' name")
        where = f"codec {codec_dir}" if codec_dir is not None else f"hubert features {model}"
        sha = str(config.get("sha256") or "")
        if checkpoint is not None:
            located = _locate(checkpoint)
            digest = files_sha256(located[2])
            if sha and digest != sha:
                raise CodecError(f"--checkpoint {checkpoint}: its weights have sha256 {digest[:16]}..., but "
                                 f"{where} was fitted on {config.get('checkpoint') or 'weights'} with sha256 {sha}")
        else:
            official = (lambda: _locate(HUBERT_MODELS[model.lower()])) if model.lower() in HUBERT_MODELS else None
            located = find_recorded(config, codec_dir, where, "HuBERT", official, _locate)[:3]
        extractor = cls.from_name(model, layer=config.get("layer"),
                                  checkpoint=str(located[0]), normalize=config.get("normalize"), located=located,
                                  **{k: v for k, v in overrides.items() if k in ("dtype", "device", "batch_size")})
        extractor.model_name = model  # the same weights, whatever the folder is called now
        extractor.check_compatible(config, where)
        return extractor

    def config(self) -> dict[str, Any]:
        return {"kind": "hubert", "model": self.model_name, "checkpoint": self.checkpoint, "sha256": self.sha256,
                "layer": self.layer, "dim": self.dim, "sample_rate": self.sample_rate, "frame_rate": self.frame_rate,
                "normalize": self.normalize,
                "normalisation": "per-file zero mean, unit variance" if self.normalize else "none (raw waveform)"}

    def check_compatible(self, stored: dict[str, Any], where: str) -> None:
        mine = self.config()
        for key in ("kind", "model", "layer", "dim", "sample_rate", "normalize", "sha256"):
            if key in stored and stored[key] != mine[key]:
                raise CodecError(f"{where}: codec was fitted on hubert features with {key}={stored[key]!r}, "
                                 f"but the extractor given has {key}={mine[key]!r}")

    def name_stem(self) -> str:
        return f"{self.model_name}-{'final' if self.layer == 'final' else f'l{self.layer}'}"

    def to(self, device) -> "HubertFeatures":
        import torch

        from ..runtime.device import resolve_dtype

        self.device = torch.device(device)
        self.dtype = resolve_dtype(self.dtype_spec or "auto", self.device)
        self.model.to(self.device, self.dtype)
        return self

    def n_frames(self, samples: int) -> int:
        """Frames of a clip of ``samples``: the conv front end's output length (no padding)."""
        n = samples
        for kernel, stride in zip(self.model.config.conv_kernel, self.model.config.conv_stride):
            n = (n - kernel) // stride + 1 if n >= kernel else 0
        return n

    @property
    def min_samples(self) -> int:
        """The conv front end's receptive field, the samples its first frame sees: 400 for
        HuBERT's (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2), though its hop is 320.
        Walked back from one output frame through each layer: ``(n - 1) * stride + kernel``."""
        return receptive_field(self.model.config.conv_kernel, self.model.config.conv_stride)

    def _forward(self, waves: "torch.Tensor", lengths: list[int]) -> "torch.Tensor":
        """``[B, frames, dim]`` for zero-padded waveform rows of ``lengths`` samples.

        Padding never reaches a clip's frames: the convolutions have no padding (a clip's
        frames see its own samples only), the transformer masks padded frames, and a
        group-norm model's first layer, whose statistics span the whole clip, runs on each
        clip alone before its output is padded into the batch."""
        import torch

        from ..runtime.device import upload_flat

        mask = None
        if len(lengths) > 1 and min(lengths) != max(lengths):
            ends = upload_flat([torch.tensor(lengths)], self.device)[0]
            mask = (torch.arange(waves.shape[1], device=self.device)[None] < ends[:, None]).long()
        with torch.inference_mode():
            x = waves.to(self.device, self.dtype)
            if mask is None or not self.group_norm:
                out = self.model(x, attention_mask=mask)
            else:
                out = self._model_after_first_layer(_first_layer_each(self.model, x, lengths), mask)
        return out.last_hidden_state.float()

    def _model_after_first_layer(self, first: "torch.Tensor", mask: "torch.Tensor"):
        """The model's forward from the first conv layer's output on: its feature encoder
        swapped, for the call, for one that runs the remaining conv layers."""
        encoder = self.model.feature_extractor
        if self._after_first is None:
            self._after_first = _conv_stack(encoder.conv_layers[1:])
        self.model.feature_extractor = self._after_first
        try:
            return self.model(first, attention_mask=mask)
        finally:
            self.model.feature_extractor = encoder

    def extract(self, waves: "list[torch.Tensor]") -> "list[torch.Tensor]":
        """Mono 16 kHz waveforms to ``[frames, dim]`` float32 tensors on the device."""
        import torch

        from ..runtime.device import upload_flat

        for wave in waves:
            if wave.dim() != 1:
                raise UsageError(f"hubert features take mono waveforms [samples], got shape {tuple(wave.shape)}")
        chunks: list[tuple[int, torch.Tensor]] = []
        for clip, wave in enumerate(upload_flat(list(waves), self.device, torch.float32)):
            if self.normalize:
                wave = (wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + _EPS)
            for start in range(0, max(len(wave), 1), MAX_CHUNK):
                chunks.append((clip, wave[start : start + MAX_CHUNK]))
        outputs: list[list[torch.Tensor]] = [[] for _ in waves]
        # On a CPU a base model runs clip by clip unless asked: batching its 10 s clips there
        # measured 5-15 % slower (2 cores, equal or mixed lengths: the CPU's kernels are
        # already busy on one clip), while on a GPU one forward per clip mostly launches kernels.
        default = 8 if self.device.type == "cuda" else 1 if self.group_norm else 4
        batch = self.batch_size or default
        order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i][1]))  # similar lengths together
        results: dict[int, torch.Tensor] = {}
        for i in range(0, len(order), batch):
            ids = order[i : i + batch]
            lengths = [len(chunks[j][1]) for j in ids]
            if max(lengths) < self.min_samples:  # shorter than one frame's receptive field
                for j in ids:
                    results[j] = torch.zeros(0, self.dim, device=self.device)
                continue
            padded = torch.zeros(len(ids), max(lengths), device=self.device)
            for row, j in enumerate(ids):
                padded[row, : lengths[row]] = chunks[j][1]
            hidden = self._forward(padded, lengths)
            for row, j in enumerate(ids):
                results[j] = hidden[row, : self.n_frames(lengths[row])]
        for j, (clip, _) in enumerate(chunks):
            outputs[clip].append(results[j])
        return [torch.cat(parts) for parts in outputs]


def receptive_field(kernels, strides) -> int:
    """Input samples a stack of unpadded 1-d convolutions needs for one output."""
    n = 1
    for kernel, stride in reversed(list(zip(kernels, strides))):
        n = (n - 1) * stride + kernel
    return n


def _first_layer_each(model, waves: "torch.Tensor", lengths: list[int]) -> "torch.Tensor":
    """The feature encoder's first conv layer on each row's first ``lengths[row]`` samples
    alone, zero-padded into ``[B, channels, frames]``. A row shorter than the model's
    receptive field (400 samples) has no frames, and goes in padded to that length."""
    first = model.feature_extractor.conv_layers[0]
    field = receptive_field(model.config.conv_kernel, model.config.conv_stride)
    outs = [first(waves[row : row + 1, : max(n, field)][:, None])[0] for row, n in enumerate(lengths)]
    batch = outs[0].new_zeros(len(outs), outs[0].shape[0], max(o.shape[-1] for o in outs))
    for row, out in enumerate(outs):
        batch[row, :, : out.shape[-1]] = out
    return batch


def _conv_stack(layers):
    """A module running ``layers`` in order (the rest of a HuBERT feature encoder)."""
    import torch

    class ConvStack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    return ConvStack()


def _display_name(folder: Path, source: str) -> str:
    stem = Path(source.rstrip("/")).name.lower()
    return stem if stem.startswith(("hubert", "mhubert")) else "hubert-" + stem


def _check_layer(layer: int | str | None, depth: int, model: str) -> int | str:
    """``--layer`` for HuBERT; None picks 9 for 12-layer models (textlesslib's units), else 2/3 of depth."""
    return check_layer(layer, depth, model, default=9 if depth == 12 else max(1, round(depth * 2 / 3)),
                       unit="transformer layer")
