"""Weight files: the reader (safetensors, torch pickles, Hugging Face folders), the restricted unpickler, the hub download cache and the file-hash cache."""
