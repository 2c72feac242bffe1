"""Tokenizer parity with raw SentencePiece and chat templates against mistral-common."""

import pickle
import random
import shutil

import pytest
import sentencepiece as spm
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_fn.errors import InputError
from mistral_fn.tokenizer import (ALPACA_SYSTEM, ALPACA_TRAINING, default_tokenizer_path, encode_conversation,
                                  encode_prompt, get_template, load_tokenizer)

FRAGMENTS = [
    "Hello world", " leading space", "  two leading", "double  space", "trailing ", "\n", "line\nbreak",
    "\n\nparagraph", "\ttab", "tab\tinside", "中文字符", "日本語のテキスト", "한국어", "emoji 😀🚀", "👍🏽",
    "digits 1234567890", "3.14159", "<s>", "literal <s> and </s>", "[INST] not special [/INST]", "▁", "café",
    "naïve façade", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u200b", "x" * 40, "  ", "   \n  ", "<unk>", "<0x0A>", "#!/bin/sh", "a\r\nb",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=default_tokenizer_path())


def varied_strings(n=300, seed=0):
    rng = random.Random(seed)
    out = list(FRAGMENTS)
    while len(out) < n:
        out.append("".join(rng.choice(FRAGMENTS) + rng.choice(["", " ", "  ", "\n", "\t"])
                           for _ in range(rng.randint(1, 5))))
    return out


def test_ids_equal_sentencepiece(tok, sp):
    texts = varied_strings()
    assert len(texts) >= 300
    for text in texts:
        assert tok.encode(text) == sp.encode(text), repr(text)
        assert tok.encode(text, bos=True, eos=True) == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]


def test_special_ids_decode_and_byte_fallback(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (32000, 1, 2, 0, 2)
    assert tok.encode("<s>") != [tok.bos_id]  # text is never parsed into special ids
    rare = "\U0001d518"  # not a piece: falls back to its four UTF-8 bytes
    pieces = tok.pieces(tok.encode(rare))
    assert pieces[-4:] == ["<0xF0>", "<0x9D>", "<0x94>", "<0x98>"]
    for text in varied_strings():  # "▁" is SentencePiece's space: it decodes to " "
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text.replace("\u2581", " "), repr(text)


def test_load_from_hf_dir_and_errors(tok, tmp_path):
    shutil.copy(default_tokenizer_path(), tmp_path / "tokenizer.model")
    assert load_tokenizer(tmp_path).encode("hi there") == tok.encode("hi there")
    assert pickle.loads(pickle.dumps(tok)).encode("pickled") == tok.encode("pickled")
    with pytest.raises(InputError, match="no tokenizer.model"):
        load_tokenizer(tmp_path / "..")
    with pytest.raises(InputError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")


CONVERSATION = [
    {"role": "system", "content": "You are terse. Answer in one line."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "  And in 中文, with\nnewlines?"},
    {"role": "assistant", "content": "四 😀"},
    {"role": "user", "content": "Thanks"},
]


def mistral_common_ids(messages):
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return MistralTokenizer.v1().encode_chat_completion(request).tokens


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[:2], CONVERSATION[3:4]])
def test_instruct_template_equals_mistral_common(tok, messages):
    assert encode_conversation(tok, messages, "mistral") == mistral_common_ids(messages)


def test_modellink_templates(tok):
    inst, close = [733, 16289, 28793], [733, 28748, 16289, 28793]
    q = tok.encode("how are you?")
    # ModelLink feeds "<s>[INST] q [/INST] " to HF encode: a literal "<s>" parsed as BOS, plus the added BOS.
    assert encode_prompt(tok, "how are you?", "mixtral_modellink") == [1, 1] + inst + q + close + [28705]
    assert encode_prompt(tok, "how are you?", "mixtral") == [1] + inst + q + close + [28705]
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert encode_conversation(tok, chat, "mixtral") == [1] + tok.encode("[INST] a [/INST] b[INST] c [/INST] ")
    alpaca = f"{ALPACA_SYSTEM}\n\n### Instruction:\nhi\n\n### Response:"
    assert encode_prompt(tok, "hi", "alpaca") == [1] + tok.encode(alpaca)
    assert encode_prompt(tok, "just text", "plain") == [1] + tok.encode("just text")


def test_template_errors(tok):
    with pytest.raises(InputError, match="unknown chat template"):
        get_template("chatml")
    with pytest.raises(InputError, match="no system prompt"):
        encode_prompt(tok, "q", "mixtral", system="s")
    with pytest.raises(InputError, match="role 'user' where 'assistant'"):
        encode_conversation(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "mistral")
    with pytest.raises(InputError, match="no user message"):
        encode_conversation(tok, [{"role": "system", "content": "s"}], "mistral")


def test_alpaca_training_text():
    text = ALPACA_TRAINING.text("Add.", "1 and 2", "3")
    assert text == f"\n{ALPACA_SYSTEM}\n### Instruction:\nAdd.\n1 and 2\n### Response:\n3\n"
    assert ALPACA_TRAINING.prompt_of(text) == f"\n{ALPACA_SYSTEM}\n### Instruction:\nAdd.\n1 and 2\n### Response:\n"


def test_alpaca_training_template_asks_in_the_fine_tuning_format(tok):
    """The prompt ids are exactly the masked prefix of a GeneralInstructionHandler sample of that instruction."""
    from mistral_fn.data.handlers import InstructionHandler
    sample = InstructionHandler(append_eod=True)(tok, {"instruction": "Sum the numbers.", "input": "", "output": "50"})
    prompt = [int(i) for i, label in zip(sample["input_ids"], sample["labels"]) if label == -100]
    assert encode_prompt(tok, "Sum the numbers.", "alpaca_training") == prompt
    assert list(sample["input_ids"][:len(prompt)]) == prompt and len(prompt) < len(sample["input_ids"])
