"""The tokenize and detokenize pipelines: records in, codec ids (or media) out, with decoding loaders and overlapped stages."""
