"""The Mistral SentencePiece tokenizer and chat/prompt templates as data.

`Tokenizer.encode` is SentencePiece's own encoding (dummy prefix, byte fallback); text is always text,
so a literal "<s>" in a string is three ordinary pieces, never the BOS id. Special ids are added
explicitly, by the caller or by a template.

Templates (`TEMPLATES`, `get_template`):
  mistral            mistral-common `InstructTokenizerV1`: BOS once, each user turn
                     `encode("[INST] {content} [/INST]")`, each answer `encode(answer) + [EOS]`,
                     a system prompt joins the first user message as `system + "\\n\\n" + content`.
  mixtral            ModelLink RC2 `--inference-prompt-type mixtral`: the text
                     `"[INST] {q} [/INST] " + answer + ...` (trailing space, no EOS between turns)
                     encoded once after a single BOS, the BOS the model was trained with.
  mixtral_modellink  the same text with the double BOS ModelLink really feeds the model: its
                     `"<s>"` prefix is parsed as BOS by HF `encode`, which adds another.
  alpaca             ModelLink RC2 `--inference-prompt-type alpaca`.
  plain              BOS and the contents, nothing else (ModelLink's default `llama` prompt type).
  alpaca_training    BOS + the prompt part of `ALPACA_TRAINING` (ModelLink's instruction-tuning text), so a
                     model fine-tuned on a `GeneralInstructionHandler` dataset is asked in its own format.
`ALPACA_TRAINING` is the different alpaca text ModelLink's `GeneralInstructionHandler` trains on.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.resources
import os
from typing import Sequence

import sentencepiece as spm

from mistral_fn.errors import InputError

_DEFAULT_MODEL = ("mistral_common", "data/tokenizer.model.v1")


def default_tokenizer_path() -> str:
    """Path of the Mistral v1 SentencePiece model shipped inside the `mistral-common` wheel."""
    package, name = _DEFAULT_MODEL
    try:
        path = importlib.resources.files(package).joinpath(name)
    except ModuleNotFoundError:
        raise InputError(f"the default tokenizer needs the {package.replace('_', '-')} package; "
                         "pass a tokenizer.model path instead") from None
    if not path.is_file():
        raise InputError(f"{path}: default tokenizer file is missing from {package}")
    return str(path)


class Tokenizer:
    """A SentencePiece model with Mistral's special ids. Picklable (reloads from its file)."""

    def __init__(self, model_file: str):
        self.model_file = str(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (OSError, RuntimeError) as e:
            raise InputError(f"{self.model_file}: not a SentencePiece model ({e})") from None

    def __reduce__(self):
        return Tokenizer, (self.model_file,)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def pad_id(self) -> int:
        """The model has no pad piece; like ModelLink, padding uses EOS."""
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """SentencePiece ids of `text`, optionally with BOS before and EOS after."""
        return self.sp.encode(text, add_bos=bos, add_eos=eos)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids decode to nothing, byte pieces back to UTF-8."""
        return self.sp.decode([int(i) for i in ids])

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]


def load_tokenizer(path_or_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Load a `tokenizer.model` file, an HF model directory holding one (ModelLink's `--tokenizer-type
    PretrainedFromHF --tokenizer-name-or-path DIR`), or (None) the default v1 model."""
    if path_or_dir is None:
        return Tokenizer(default_tokenizer_path())
    path = os.fspath(path_or_dir)
    if os.path.isdir(path):
        model = os.path.join(path, "tokenizer.model")
        if not os.path.isfile(model):
            fast_only = os.path.isfile(os.path.join(path, "tokenizer.json"))
            raise InputError(f"{path}: no tokenizer.model in this directory (the SentencePiece model is required"
                             f"{'; its tokenizer.json, a fast tokenizer, cannot replace it' if fast_only else ''})")
        path = model
    if not os.path.isfile(path):
        raise InputError(f"{path}: tokenizer file not found")
    return Tokenizer(path)


class Special(enum.Enum):
    """Markers in a rendered template, replaced by the tokenizer's ids (never confused with text)."""

    BOS = "bos"
    EOS = "eos"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format as data. `{content}` is the message text in `user`/`assistant`.

    `bos`: BOS ids at the start; `prefix`: text before the first turn; `assistant_eos`: EOS after
    each answer; `system`: how a system prompt joins the first user message (None: not supported);
    `per_turn`: encode each turn on its own (mistral-common) instead of the whole text at once (ModelLink).
    """

    name: str
    user: str
    assistant: str = "{content}"
    bos: int = 1
    prefix: str = ""
    assistant_eos: bool = False
    system: str | None = None
    per_turn: bool = False


ALPACA_SYSTEM = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request. Please note that you need "
                 "to think through your response logically and step by step.")


@dataclasses.dataclass(frozen=True)
class InstructionTemplate:
    """ModelLink RC2's training text for an instruction/input/output row (`Prompter(AlpacaTemplate)`).

    text = "\\n" + system + "\\n" + "### Instruction:\\n" + instruction + "\\n" + input + "\\n"
           + "### Response:\\n" + output + "\\n"
    The prompt part (masked out of the labels) is the text up to the last `response_marker`, plus the
    marker and "\\n", exactly as ModelLink cuts it.
    """

    system: str
    user: str = "### Instruction:\n{instruction}\n{input}\n"
    response_marker: str = "### Response:"

    def text(self, instruction: str, input: str, output: str) -> str:
        user = self.user.format(instruction=instruction, input=input)
        return f"\n{self.system}\n{user}{self.response_marker}\n{output}\n"

    def prompt_of(self, text: str) -> str:
        return text.rsplit(self.response_marker, 1)[0] + self.response_marker + "\n"


ALPACA_TRAINING = InstructionTemplate(system=ALPACA_SYSTEM)

TEMPLATES = {t.name: t for t in (
    ChatTemplate("mistral", user="[INST] {content} [/INST]", assistant_eos=True,
                 system="{system}\n\n{content}", per_turn=True),
    ChatTemplate("mixtral", user="[INST] {content} [/INST] "),
    ChatTemplate("mixtral_modellink", user="[INST] {content} [/INST] ", bos=2),
    ChatTemplate("alpaca", user="### Instruction:\n{content}\n\n### Response:", prefix=ALPACA_SYSTEM + "\n\n"),
    ChatTemplate("plain", user="{content}"),
    # ModelLink's instruction-tuning text (GeneralInstructionHandler): asks a model fine-tuned on it in its own format
    ChatTemplate("alpaca_training", prefix=f"\n{ALPACA_TRAINING.system}\n", assistant="{content}\n",
                 user=ALPACA_TRAINING.user.format(instruction="{content}", input="") + ALPACA_TRAINING.response_marker
                 + "\n"),
)}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise InputError(f"unknown chat template {name!r}; expected one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def render(messages: Sequence[dict], template: ChatTemplate) -> list[str | Special]:
    """Conversation → ordered pieces: text segments and the BOS/EOS markers.

    `messages`: dicts with "role" (system, user, assistant) and "content"; an optional system message
    first, then user and assistant alternating, starting with user.
    """
    messages = list(messages)
    system = None
    if messages and messages[0].get("role") == "system":
        system = messages.pop(0).get("content", "")
        if template.system is None:
            raise InputError(f"chat template {template.name!r} has no system prompt; drop the system message")
    if not messages:
        raise InputError("conversation has no user message")
    pieces: list[str | Special] = [Special.BOS] * template.bos + ([template.prefix] if template.prefix else [])
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise InputError(f"message {i}: role {role!r} where {expected!r} was expected "
                             "(optional system first, then user/assistant alternating)")
        if not isinstance(content, str):
            raise InputError(f"message {i}: content must be a string, got {type(content).__name__}")
        if role == "user":
            if i == 0 and system is not None:
                content = template.system.format(system=system, content=content)
            pieces.append(template.user.format(content=content))
        else:
            pieces.append(template.assistant.format(content=content))
            if template.assistant_eos:
                pieces.append(Special.EOS)
    return pieces


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[dict], template: ChatTemplate | str) -> list[int]:
    """Token ids of a conversation in `template` (a name or a `ChatTemplate`)."""
    template = get_template(template) if isinstance(template, str) else template
    special = {Special.BOS: tokenizer.bos_id, Special.EOS: tokenizer.eos_id}
    ids: list[int] = []
    text = ""
    for piece in render(messages, template):
        if isinstance(piece, Special) or template.per_turn:
            ids += tokenizer.encode(text)
            text = ""
        if isinstance(piece, Special):
            ids.append(special[piece])
        else:
            text += piece
    return ids + tokenizer.encode(text)


def encode_prompt(tokenizer: Tokenizer, prompt: str, template: ChatTemplate | str,
                  system: str | None = None) -> list[int]:
    """Token ids of a single user prompt ready for generation (the model answers next)."""
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    return encode_conversation(tokenizer, messages + [{"role": "user", "content": prompt}], template)


