"""Preprocessing handlers (ModelLink RC2 `data_handler.py` behaviour): one row → one document per output.

A handler is a frozen config with `input_keys` (row fields read), `outputs` (output dataset names),
`id_outputs` (outputs holding token ids) and `__call__(tokenizer, row) -> {output: int32 array}`.

  GeneralPretrainHandler     per json key: BOS + encode(text) [+ EOS with append_eod]
                             → `<prefix>_<key>_document`
  GeneralInstructionHandler  the alpaca training text (`ALPACA_TRAINING`), BOS + encode(text) [+ EOS];
                             labels = ids with the first L positions −100, L = length of the separately
                             encoded prompt (BOS included); attention mask all 1
                             → `<prefix>_packed_{input_ids,attention_mask,labels}_document`
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mistral_fn.data.sources import parse_row
from mistral_fn.errors import InputError
from mistral_fn.tokenizer import ALPACA_TRAINING, InstructionTemplate, Tokenizer
from mistral_fn.vocab_parallel import IGNORE_INDEX


def row_text(row: dict, key: str, allow_empty: bool = False) -> str:
    """The text under `key`: present, a string (or UTF-8 bytes), valid Unicode, non-blank unless allowed."""
    if key not in row:
        raise InputError(f"missing key {key!r} (row has {', '.join(map(repr, row)) or 'no keys'})")
    value = row[key]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{key!r}: invalid UTF-8 at byte {e.start}") from None
    if not isinstance(value, str):
        raise InputError(f"{key!r}: expected text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{key!r}: invalid UTF-8 (unpaired surrogate at character {e.start})") from None
    if not allow_empty and not value.strip():
        raise InputError(f"{key!r}: empty text")
    return value


@dataclasses.dataclass(frozen=True)
class PretrainHandler:
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = False

    @property
    def input_keys(self) -> tuple[str, ...]:
        return self.json_keys

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.json_keys

    id_outputs = outputs

    def output_prefix(self, prefix: str, output: str) -> str:
        return f"{prefix}_{output}_document"

    def __call__(self, tokenizer: Tokenizer, row: dict) -> dict[str, np.ndarray]:
        return {key: np.asarray(tokenizer.encode(row_text(row, key), bos=True, eos=self.append_eod), np.int32)
                for key in self.json_keys}


@dataclasses.dataclass(frozen=True)
class InstructionHandler:
    append_eod: bool = False
    template: InstructionTemplate = ALPACA_TRAINING
    input_keys = ("instruction", "input", "output")
    outputs = ("input_ids", "attention_mask", "labels")
    id_outputs = ("input_ids",)

    def output_prefix(self, prefix: str, output: str) -> str:
        return f"{prefix}_packed_{output}_document"

    def __call__(self, tokenizer: Tokenizer, row: dict) -> dict[str, np.ndarray]:
        instruction, input_, output = (row_text(row, key, allow_empty=key == "input") for key in self.input_keys)
        text = self.template.text(instruction, input_, output)
        ids = np.asarray(tokenizer.encode(text, bos=True, eos=self.append_eod), np.int32)
        labels = ids.copy()
        labels[:len(tokenizer.encode(self.template.prompt_of(text), bos=True))] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


HANDLER_NAMES = ("GeneralPretrainHandler", "GeneralInstructionHandler")


def make_handler(name: str, json_keys: tuple[str, ...] = ("text",), append_eod: bool = False):
    """A handler by its ModelLink name; `json_keys` applies to the pretraining handler only."""
    if name == "GeneralPretrainHandler":
        return PretrainHandler(tuple(json_keys), append_eod)
    if name == "GeneralInstructionHandler":
        return InstructionHandler(append_eod)
    raise InputError(f"--handler_name {name!r}: expected one of {', '.join(HANDLER_NAMES)}")


def check_vocab(docs: dict[str, np.ndarray], keys, vocab_size: int) -> None:
    """Raise if any token id in `docs[keys]` lies outside [0, vocab_size)."""
    for key in keys:
        ids = docs[key]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise InputError(f"{key}: token id {ids.max() if ids.max() >= vocab_size else ids.min()} "
                             f"is outside the vocabulary [0, {vocab_size})")


def encode_row(handler, tokenizer: Tokenizer, where: str, raw, vocab_size: int) -> dict[str, np.ndarray]:
    """Parse and encode one input row; any problem is an `InputError` naming `where` (file and row)."""
    try:
        docs = handler(tokenizer, parse_row(raw))
        check_vocab(docs, handler.id_outputs, vocab_size)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    return docs
