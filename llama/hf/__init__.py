"""Hugging Face ``transformers`` Llama folders, to and from Meta's checkpoint folders.

- ``config``: config.json <-> params.json (sizes, FFN parameters, Llama 3.1's RoPE scaling), and reading JSON files.
- ``tokenizers``: the tokenizer files HF reads, written from Meta's tokenizer.model (SentencePiece for Llama 2,
  tiktoken ranks for Llama 3 with its chat template), and Llama 3's tokenizer.model recovered from a tokenizer.json.
- ``weights``: the safetensors files: a lazy reader, the checks on what they hold, the writer, tied embeddings.
- ``convert``: ``to_hf`` and ``from_hf``, the two drivers (``python -m llama.convert`` is their command line).

The weights' own differences (the name table and the q/k permutation) are layout facts, kept in
``llama.weights.layout``.
"""
