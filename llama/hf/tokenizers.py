"""The tokenizer files of a Hugging Face folder, written from Meta's tokenizer.model and read back.

- Llama 2 (SentencePiece): tokenizer.model is copied, and a ``tokenizers`` tokenizer.json is made from its BPE
  pieces and scores, so that AutoTokenizer needs no protobuf.
- Llama 3 (tiktoken ranks): a byte-level BPE tokenizer.json whose merges are the pairs tiktoken itself joins
  (``bpe_split``), with the chat template of ``Llama3ChatFormat``; and the way back, Meta's ranks file recovered
  from a tokenizer.json, refused where it would tokenize otherwise.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from llama.families import FAMILIES, Family, family_of, load_tokenizer
from llama.hf.config import read_json
from llama.tokenizer import Llama3Tokenizer, Tokenizer, TokenizerLike, parse_ranks, read_ranks

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------- Llama 2 (SentencePiece) files


def sentencepiece_model_type(serialized: bytes) -> int:
    """trainer_spec.model_type of a serialized SentencePiece ModelProto: 1 unigram, 2 BPE, 3 word, 4 char.

    A few lines of protobuf wire format (ModelProto field 2 is trainer_spec, TrainerSpec field 3 is model_type),
    so that no protobuf package is needed.
    """

    def varint(buf: bytes, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if byte < 0x80:
                return value, pos

    def fields(buf: bytes) -> Iterator[tuple[int, Any]]:
        pos = 0
        while pos < len(buf):
            key, pos = varint(buf, pos)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = varint(buf, pos)
            elif wire == 2:
                size, pos = varint(buf, pos)
                value, pos = buf[pos : pos + size], pos + size
            elif wire in (1, 5):
                size = 8 if wire == 1 else 4
                value, pos = buf[pos : pos + size], pos + size
            else:
                raise ValueError(f"unexpected protobuf wire type {wire}")
            yield number, value

    for number, value in fields(serialized):
        if number == 2:
            return next((v for n, v in fields(value) if n == 3), 1)  # model_type defaults to UNIGRAM
    return 1


def _bos_post_processor(bos: str, bos_id: int) -> dict[str, Any]:
    """tokenizers' post-processor that puts the BOS token `bos` (id bos_id) before each sequence, as Llama does."""
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
        ],  # fmt: skip
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def tokenizer_json(tokenizer: Tokenizer) -> Optional[dict[str, Any]]:
    """A ``tokenizers`` tokenizer.json for a SentencePiece BPE model such as Llama's; None for other models.

    transformers 5 turns a bare tokenizer.model into its fast tokenizer only with protobuf installed; with this
    file next to it, AutoTokenizer needs neither. SentencePiece's BPE joins, at each step, the adjacent pair whose
    joined piece scores highest; a merge list ordered by the joined piece's score does the same.
    """
    sp = tokenizer.sp_model
    if sentencepiece_model_type(sp.serialized_model_proto()) != 2:
        return None
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    special = [i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)]
    normal = [i for i in range(len(pieces)) if not (i in special or sp.is_byte(i) or sp.is_unused(i))]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    mergeable = {pieces[i] for i in normal}
    merges = []
    for i in sorted(normal, key=lambda i: -sp.get_score(i)):  # best first; sorted() keeps id order for ties
        piece = pieces[i]
        merges += [[piece[:j], piece[j:]] for j in range(1, len(piece)) if {piece[:j], piece[j:]} <= mergeable]
    bos, unk = pieces[tokenizer.bos_id], pieces[sp.unk_id()]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i in special
        ],  # fmt: skip
        # As SentencePiece with Llama's settings: "▁" before the text (add_dummy_prefix), and for every space.
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": _bos_post_processor(bos, tokenizer.bos_id),
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },  # fmt: skip
    }


def write_hf_tokenizer(tokenizer: Tokenizer, tokenizer_path: str | os.PathLike, out_dir: Path, max_length: int) -> None:
    """Copy tokenizer.model into out_dir with the tokenizer_config.json (and tokenizer.json) that HF reads."""
    sp = tokenizer.sp_model
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": sp.id_to_piece(tokenizer.bos_id),
        "eos_token": sp.id_to_piece(tokenizer.eos_id),
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "pad_token": None,  # Llama has no padding piece
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    fast = tokenizer_json(tokenizer)
    if fast is None:
        logger.warning("%s is not a BPE model: wrote no tokenizer.json (HF then needs protobuf)", tokenizer_path)
    else:
        (out_dir / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------ Llama 3 tokenizer files


def byte_level_alphabet() -> list[str]:
    """The character that stands for each byte value in a byte-level BPE vocabulary (GPT-2's convention, which
    ``tokenizers``' ByteLevel uses): printable Latin-1 bytes stand for themselves; the other 68 byte values take
    the characters from U+0100 on, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    alphabet, extra = [], 0
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(256 + extra))
            extra += 1
    return alphabet


def bpe_split(token: bytes, ranks: Mapping[bytes, int]) -> Optional[tuple[bytes, bytes]]:
    """The two tokens that tiktoken joins last when it encodes the bytes of `token` by merging alone; None when
    that does not end in `token` (tiktoken then gives it only for a whole pre-tokenized piece).

    Merging inside a span never depends on the text around it, so wherever tiktoken forms `token`, it forms it
    from this pair. (The pair whose larger rank is smallest is not always this pair.)
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, where = None, -1
        for i in range(len(parts) - 1):  # the lowest-ranked joined pair, leftmost on ties, as tiktoken
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best):
                best, where = rank, i
        if best is None:
            return None
        parts[where : where + 2] = [parts[where] + parts[where + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 and parts[0] + parts[1] in ranks else None


def llama3_tokenizer_json(tokenizer: Llama3Tokenizer, ranks: Mapping[bytes, int]) -> dict[str, Any]:
    """A ``tokenizers`` tokenizer.json that gives the ids of `tokenizer`, whose BPE ranks (its tokenizer.model)
    are `ranks`.

    Vocabulary: each token's bytes in the byte-level alphabet, its rank as id. Merges: for each token, the pair
    tiktoken joins into it (``bpe_split``), in rank order, so the merge with the lowest rank goes first as in
    tiktoken. ``ignore_merges`` takes a whole pre-tokenized piece that is a token as it is, as tiktoken does.
    Special-token text is an added token here, whereas Llama3Tokenizer encodes it as plain text.
    """
    alphabet = byte_level_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    vocab = {text(token): rank for token, rank in by_rank}
    merges = []
    for token, _ in by_rank:
        pair = bpe_split(token, ranks) if len(token) > 1 else None
        if pair is not None:
            merges.append([text(pair[0]), text(pair[1])])
    bos = "<|begin_of_text|>"
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for name, i in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])
        ],  # fmt: skip
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tokenizer.pat_str}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": _bos_post_processor(bos, tokenizer.bos_id),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
            "vocab": vocab, "merges": merges,
        },  # fmt: skip
    }


# Llama3ChatFormat.encode_dialog_prompt for text messages: the header, content as given (no strip, as
# llama_models), end of turn; "tool" is written "ipython". Whitespace control ({{- -%}}) keeps the template's own
# line breaks out of the prompt.
LLAMA3_CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}\n"
    "{%- for message in messages -%}\n"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}\n"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}\n"
    "{%- endif -%}\n"
)


def write_llama3_hf_tokenizer(
    tokenizer: Llama3Tokenizer, tokenizer_path: str | os.PathLike, out_dir: Path, max_length: int
) -> None:
    """Copy tokenizer.model into out_dir with the tokenizer.json and tokenizer_config.json that HF reads."""
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    names = {i: name for name, i in tokenizer.special_tokens.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names[tokenizer.bos_id],
        "eos_token": names[tokenizer.eos_id],  # what encode(eos=True) appends; config.json lists every stop id
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # True would change decoded text (" ." -> ".")
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_length,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    fast = llama3_tokenizer_json(tokenizer, read_ranks(os.fspath(tokenizer_path)))
    (out_dir / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_tokenizer_files(
    tokenizer: TokenizerLike, tokenizer_path: str | os.PathLike, out_dir: Path, max_length: int
) -> None:
    """The tokenizer files of a Hugging Face folder for `tokenizer` (read from tokenizer_path), in out_dir."""
    if isinstance(tokenizer, Llama3Tokenizer):
        write_llama3_hf_tokenizer(tokenizer, tokenizer_path, out_dir, max_length)
    else:
        write_hf_tokenizer(tokenizer, tokenizer_path, out_dir, max_length)


def is_byte_level_bpe(contents: Any) -> bool:
    """Whether a parsed tokenizer.json is a byte-level BPE (tiktoken-style, as Llama 3's), not SentencePiece's."""
    if not isinstance(contents, dict) or not isinstance(contents.get("model"), dict):
        return False
    pre = contents.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    return contents["model"].get("type") == "BPE" and any(
        isinstance(step, dict) and step.get("type") == "ByteLevel" for step in steps
    )


def llama3_ranks_file(contents: Mapping[str, Any], source: str) -> bytes:
    """Meta's Llama 3 tokenizer.model (``<base64 token> <rank>`` a line) for a parsed byte-level tokenizer.json.

    The ranks are the vocabulary ids, the added (special) tokens left out. A ValueError when the file would
    tokenize otherwise than Meta's tokenizer: another split pattern, merges out of rank order, or special
    tokens other than Llama 3's at their ids (checked by the caller).
    """
    model = contents["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise ValueError(f"{source}: the BPE model has no 'vocab' object")
    patterns = [
        step.get("pattern", {}).get("Regex")
        for step in (contents.get("pre_tokenizer") or {}).get("pretokenizers", [])
        if isinstance(step, dict) and step.get("type") == "Split"
    ]
    if patterns != [Llama3Tokenizer.pat_str]:
        raise ValueError(
            f"{source}: its pre-tokenizer does not split text with Llama 3's pattern (found {patterns!r}), so "
            "a Llama 3 tokenizer.model made from it would give other ids"
        )
    added = {t["content"] for t in _added_tokens(contents, source)}
    alphabet = byte_level_alphabet()
    byte_of = {char: byte for byte, char in enumerate(alphabet)}
    ranks: dict[bytes, int] = {}
    for token, rank in vocab.items():
        if token in added:
            continue
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise ValueError(f"{source}: the id of token {token!r} must be an integer, got {rank!r}")
        try:
            ranks[bytes(byte_of[c] for c in token)] = rank
        except KeyError as e:
            raise ValueError(f"{source}: token {token!r} is not in the byte-level alphabet") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{source}: the ids of the ordinary tokens must be 0..{len(ranks) - 1}, each once")
    # tiktoken joins first the pair whose joined token has the lowest rank: the merges must be in that order.
    merges = _merge_pairs(model.get("merges"), source)
    last = -1
    for left, right in merges:
        rank = vocab.get(left + right)
        if rank is None or rank < last:
            raise ValueError(
                f"{source}: merge {left!r} + {right!r} is out of the order of the ids, so tiktoken ranks made "
                "from the ids would tokenize differently"
            )
        last = rank
    by_rank = sorted(ranks.items(), key=lambda item: item[1])

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    # And every pair that tiktoken joins must be a merge, or Hugging Face's tokenizer would give other ids than
    # the tokenizer.model made from the ids ("merges": [] would leave it only the whole tokens of ignore_merges).
    merge_set, lacking = set(merges), []
    for token, rank in by_rank:
        pair = bpe_split(token, ranks) if len(token) > 1 else None
        if pair is not None and (text(pair[0]), text(pair[1])) not in merge_set:
            lacking.append((text(token), rank, text(pair[0]), text(pair[1])))
    if lacking:
        token, rank, left, right = lacking[0]
        raise ValueError(
            f"{source}: its merges lack {left!r} + {right!r}, the pair tiktoken joins into token {token!r} (id "
            f"{rank}), and {len(lacking) - 1} more such pairs; Hugging Face's tokenizer would tokenize otherwise "
            "than a tokenizer.model made from the ids"
        )
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in by_rank)


def _merge_pairs(merges: Any, source: str) -> list[tuple[str, str]]:
    """The merges of a tokenizer.json's BPE model as (left, right); tokenizers writes each one as a list
    [left, right], or in older files as a string "left right"."""
    if not isinstance(merges, list):
        raise ValueError(f"{source}: the BPE model's 'merges' must be a list, got {type(merges).__name__}")
    pairs = []
    for i, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair)):
            raise ValueError(
                f"{source}: merge {i} is {merge!r}; each merge must be two tokens, as [left, right] or \"left right\""
            )
        pairs.append((pair[0], pair[1]))
    return pairs


def _added_tokens(contents: Mapping[str, Any], source: str) -> list[dict[str, Any]]:
    """A tokenizer.json's 'added_tokens': a list of objects, each with a str 'content' and an int 'id'."""
    added = contents.get("added_tokens", [])
    if not isinstance(added, list) or not all(
        isinstance(t, dict) and isinstance(t.get("content"), str) and type(t.get("id")) is int for t in added
    ):
        raise ValueError(f"{source}: 'added_tokens' must be a list of objects with a str 'content' and an int 'id'")
    return added


def read_hf_tokenizer(hf: Path, params: Mapping[str, Any]) -> tuple[Family, Optional[tuple[bytes, int]]]:
    """The family of a Hugging Face folder, and for Llama 3 without a tokenizer.model, the one rebuilt from its
    tokenizer.json with its number of tokens (ordinary and special).

    The tokenizer tells: a Llama 3 tokenizer.model, or a byte-level BPE tokenizer.json, is Llama 3. Without
    either, Llama 3.1's scaled RoPE says Llama 3 too; anything else is written in Llama 2's layout.
    """
    model_file, json_file = hf / "tokenizer.model", hf / "tokenizer.json"
    if model_file.is_file():
        return family_of(load_tokenizer(model_file)), None
    if json_file.is_file():
        contents = read_json(json_file)
        if not isinstance(contents, dict) or not isinstance(contents.get("model"), dict):
            # Skipped, it would leave the Meta folder without a tokenizer.model, or in the wrong generation.
            raise ValueError(
                f"{str(json_file)!r} is not a tokenizer.json of Hugging Face's tokenizers (a JSON object whose "
                "'model' is an object); replace it with the model's own tokenizer.json"
            )
        if is_byte_level_bpe(contents):
            ranks_file = llama3_ranks_file(contents, str(json_file))
            # Checked as Llama3Tokenizer will read it, in memory: a file written elsewhere could be left behind.
            rebuilt = Llama3Tokenizer.from_ranks(parse_ranks(ranks_file, str(json_file)), "tokenizer.model")
            added = {t["content"]: t["id"] for t in _added_tokens(contents, str(json_file))}
            if added != rebuilt.special_tokens:
                wrong = sorted(set(added.items()) ^ set(rebuilt.special_tokens.items()), key=str)[:3]
                raise ValueError(
                    f"{str(json_file)!r}: its added tokens are not Llama 3's 256 special tokens at their ids "
                    f"(e.g. {wrong}); Meta's tokenizer.model cannot hold other ones"
                )
            return FAMILIES[1], (ranks_file, rebuilt.n_words)
    return (FAMILIES[1] if params.get("use_scaled_rope") else FAMILIES[0]), None
