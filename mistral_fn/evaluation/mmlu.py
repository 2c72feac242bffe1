"""MMLU (Hendrycks et al.) from its CSV layout under two protocols, because published numbers differ
by protocol:

* `modellink` — the seed's (ModelLink `evaluation.py --task mmlu`): a k-shot prompt (default 5, the
  examples joined by "\\n" after a header with two spaces before the subject), wrapped in a chat template
  (Mistral-Instruct's `[INST] ... [/INST]` by default), one greedy token over the whole vocabulary,
  decoded, `lstrip`ped and matched to a letter with the seed's two regexes (a miss counts as wrong);
* `harness` — lm-evaluation-harness's `mmlu`: k-shot examples from the dev split joined by "\\n\\n", no
  chat template, the choice among " A", " B", " C", " D" with the highest log-likelihood.

Data: `<data_path>/<subject>_test.csv` without a header row (question, A, B, C, D, answer); few-shot
examples come from `<subject>_dev.csv` next to it or in a sibling `dev/` directory (Hendrycks' layout
`data/{test,dev}/`). A prompt longer than the context drops few-shot examples (the last first); a
question that does not fit even with none is an error, never silently skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from mistral_fn.errors import InputError
from mistral_fn.sampling import check_logits
from mistral_fn.tokenizer import Tokenizer, encode_prompt

CHOICES = ("A", "B", "C", "D")
PROTOCOLS = ("modellink", "harness")
# The seed's answer extraction (`MmluEval.eval`), in order; note that "|" is inside its classes.
MODELLINK_PATTERNS = (re.compile(r".*(?P<answer>[A|B|C|D])\..*"), re.compile(r"(?P<answer>[A|B|C|D])"))

_CATEGORIES = {
    "STEM": ("abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
             "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
             "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
             "high_school_computer_science", "high_school_mathematics", "high_school_physics",
             "high_school_statistics", "machine_learning"),
    "humanities": ("formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"),
    "social sciences": ("econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"),
    "other": ("anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
              "professional_medicine", "virology"),
}
# Hendrycks' `categories.py` map of the 57 subjects; a subject outside it is reported as "uncategorized".
SUBJECT_CATEGORIES = {subject: category for category, subjects in _CATEGORIES.items() for subject in subjects}


@dataclasses.dataclass(frozen=True)
class Question:
    """One CSV row: `index` is its 0-based row number in the subject's file."""

    subject: str
    index: int
    question: str
    choices: tuple[str, str, str, str]
    answer: str


# ---- data -----------------------------------------------------------------------------------------

def read_csv(path: Path, subject: str) -> list[Question]:
    """The questions of a header-less MMLU CSV (UTF-8, an optional BOM). A file that cannot be read, is
    not UTF-8 or holds a malformed row raises `InputError` naming the file and line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line}: not UTF-8 (byte {e.start} is {data[e.start]:#04x}); "
                         "save the file as UTF-8") from None
    questions = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if not row:
                continue
            where = f"{path}: line {reader.line_num}"
            if len(row) != 6:
                raise InputError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            answer = row[5].strip()
            if answer not in CHOICES:
                raise InputError(f"{where}: answer {row[5]!r} is not one of A, B, C, D")
            questions.append(Question(subject, len(questions), row[0], tuple(row[1:5]), answer))
    except csv.Error as e:
        raise InputError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    if not questions:
        raise InputError(f"{path}: no questions")
    return questions


def load_mmlu(data_path: str | Path, num_fewshot: int) -> tuple[dict[str, list[Question]], dict[str, list[Question]]]:
    """`(test, dev)`: `{subject: questions}` of every `<subject>_test.csv` in `data_path` (sorted by
    subject), and each subject's first `num_fewshot` dev questions."""
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise InputError(f"{data_path}: MMLU data directory not found")
    files = sorted(f for f in data_path.glob("*_test.csv") if f.is_file())
    if not files:
        raise InputError(f"{data_path}: no <subject>_test.csv files")
    test, dev = {}, {}
    for file in files:
        subject = file.name[: -len("_test.csv")]
        test[subject] = read_csv(file, subject)
        if num_fewshot == 0:
            dev[subject] = []
            continue
        candidates = [data_path / f"{subject}_dev.csv", data_path.parent / "dev" / f"{subject}_dev.csv"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise InputError(f"{subject}: no dev split ({candidates[0]} or {candidates[1]}) for {num_fewshot}-shot prompts")
        dev[subject] = read_csv(found, subject)[:num_fewshot]
        if len(dev[subject]) < num_fewshot:
            raise InputError(f"{found}: {len(dev[subject])} dev questions, num_fewshot={num_fewshot} needs that many")
    return test, dev


# ---- prompts --------------------------------------------------------------------------------------

def _block(q: Question, question: str, answer: bool) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(CHOICES, q.choices))
    return f"{question}{options}\nAnswer:" + (f" {q.answer}" if answer else "")


def modellink_prompt(q: Question, shots: Sequence[Question]) -> str:
    """The seed's instruction: header, examples joined by "\\n", a blank line, the question."""
    header = f"The following are multiple choice questions (with answers) about  {q.subject.replace('_', ' ')}.\n"
    examples = "\n".join(_block(s, s.question, True) for s in shots)
    return header + examples + "\n\n" + _block(q, q.question, False)


def harness_prompt(q: Question, shots: Sequence[Question]) -> str:
    """lm-evaluation-harness's context: description, then examples and the question joined by "\\n\\n"."""
    header = f"The following are multiple choice questions (with answers) about {q.subject.replace('_', ' ')}.\n\n"
    return header + "".join(_block(s, s.question.strip(), True) + "\n\n" for s in shots) + _block(q, q.question.strip(), False)


def encode(tokenizer: Tokenizer, protocol: str, text: str, chat_template: str | None) -> list[int]:
    """Prompt ids: `modellink` wraps the text in `chat_template` (None: BOS + text), `harness` is BOS + text."""
    if protocol == "modellink" and chat_template is not None:
        return encode_prompt(tokenizer, text, chat_template)
    return [tokenizer.bos_id] + tokenizer.encode(text)


def fitted_prompt(tokenizer: Tokenizer, protocol: str, q: Question, shots: Sequence[Question], max_len: int,
                  chat_template: str | None) -> tuple[list[int], int, str]:
    """`(ids, shots used, text)` with as many of `shots` as fit in `max_len - 1` tokens (one to predict)."""
    make = modellink_prompt if protocol == "modellink" else harness_prompt
    for k in range(len(shots), -1, -1):
        text = make(q, shots[:k])
        ids = encode(tokenizer, protocol, text, chat_template)
        if len(ids) < max_len:
            return ids, k, text
    raise InputError(f"{q.subject} question {q.index}: {len(ids)} prompt tokens with no examples do not fit the "
                     f"context of {max_len}")


# ---- scoring --------------------------------------------------------------------------------------

def modellink_answer(text: str) -> str | None:
    """The seed's extraction from the decoded, `lstrip`ped generated text (None: no match)."""
    for pattern in MODELLINK_PATTERNS:
        match = pattern.match(text.lstrip())
        if match:
            return match.group("answer")
    return None


def choice_ids(tokenizer: Tokenizer, context: str) -> list[int]:
    """The token of each continuation " A" … " D" after `context`, split from the encoding of the
    whole text as the harness does; each must be a single token."""
    base = tokenizer.encode(context)
    ids = []
    for letter in CHOICES:
        whole = tokenizer.encode(context + " " + letter)
        if whole[:len(base)] != base or len(whole) != len(base) + 1:
            raise InputError(f"the continuation ' {letter}' is not a single token after the context; the harness "
                             "protocol here needs single-token answers")
        ids.append(whole[-1])
    return ids


def score(protocol: str, tokenizer: Tokenizer, logits: torch.Tensor, text: str) -> dict:
    """Prediction for one question from its next-token logits `[V]`: `{"prediction", ...details}`."""
    if protocol == "modellink":
        output = tokenizer.decode([int(logits.argmax())])
        return {"prediction": modellink_answer(output), "output": output}
    logprobs = logits.float().log_softmax(-1)[choice_ids(tokenizer, text)].tolist()
    best = max(range(len(CHOICES)), key=lambda i: logprobs[i])
    return {"prediction": CHOICES[best], "loglikelihoods": dict(zip(CHOICES, logprobs))}


def aggregate(predictions: Sequence[dict]) -> dict:
    """Accuracy micro-averaged over all questions (`accuracy`, the seed's "total"), the mean over
    subjects (`macro_accuracy`), and per subject and per category (micro within the category)."""
    subjects: dict[str, dict] = {}
    categories: dict[str, dict] = {}
    for p in predictions:
        category = SUBJECT_CATEGORIES.get(p["subject"], "uncategorized")
        for table, key in ((subjects, p["subject"]), (categories, category)):
            entry = table.setdefault(key, {"n": 0, "correct": 0})
            entry["n"] += 1
            entry["correct"] += int(p["correct"])
        subjects[p["subject"]]["category"] = category
    for entry in (*subjects.values(), *categories.values()):
        entry["accuracy"] = entry["correct"] / entry["n"]
    n, correct = len(predictions), sum(int(p["correct"]) for p in predictions)
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "macro_accuracy": sum(s["accuracy"] for s in subjects.values()) / len(subjects) if subjects else 0.0,
        "subjects": dict(sorted(subjects.items())),
        "categories": dict(sorted(categories.items())),
    }


def evaluate(logits_fn: Callable[[list[list[int]]], torch.Tensor], tokenizer: Tokenizer, test: dict, dev: dict, *,
             protocol: str, max_len: int, chat_template: str | None = "mistral", batch_size: int = 1,
             progress: bool = False) -> dict:
    """Score every question of `test` (`load_mmlu`), `batch_size` prompts per `logits_fn` call
    (prompt ids → next-token logits `[B, V]`, e.g. `generate.next_token_logits`; non-finite ones raise
    `InputError`). Returns `aggregate`'s numbers plus `predictions` (one dict per question, in subject
    then row order)."""
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown MMLU protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    items = [(q, *fitted_prompt(tokenizer, protocol, q, dev[subject], max_len, chat_template))
             for subject, questions in test.items() for q in questions]
    predictions = []
    with tqdm(total=len(items), desc=f"mmlu/{protocol}", unit="q", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            logits = logits_fn([ids for _, ids, _, _ in batch])
            check_logits(logits)  # NaN logits would score as answer "A" or a regex miss, silently
            for (q, _, shots, text), row in zip(batch, logits):
                result = score(protocol, tokenizer, row, text)
                predictions.append({"subject": q.subject, "index": q.index, "answer": q.answer, **result,
                                    "correct": result["prediction"] == q.answer, "num_fewshot": shots})
            bar.update(len(batch))
    return {**aggregate(predictions), "predictions": predictions}
