"""Tiny causal LMs in the real Hugging Face format, made in the test run (no download).

``make_tiny_llm(directory, arch)`` writes ``config.json`` + ``model.safetensors`` + a small
byte-level BPE tokenizer, exactly what ``AutoModelForCausalLM.from_pretrained`` reads, for
the architectures teal must wrap: Llama (SmolLM2's), Qwen2 and GPT-2.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The capital of France is Paris.",
    "a handwritten seven", "a handwritten three", "the digit zero", "draw a nine",
    "Image: The handwritten digit in the image is seven.",
    "one two three four five six seven eight nine zero",
    "The quick brown fox jumps over the lazy dog.",
]
EOS = "<|endoftext|>"


def make_tokenizer(directory: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    fast.save_pretrained(str(directory))
    return fast


def make_tiny_llm(directory: str | Path, arch: str = "llama", *, tie: bool = True, seed: int = 0,
                  hidden: int = 32, layers: int = 2, context: int = 256) -> Path:
    """Write a random tiny ``arch`` (llama | qwen2 | gpt2) causal LM with its tokenizer to ``directory``."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(directory)
    vocab = len(tok)
    common = dict(vocab_size=vocab, tie_word_embeddings=tie, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=context, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=context, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=context, **common)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # Random init is tiny (std 0.02): scale up so that greedy decoding is not a sea of near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory
