"""MMLU on a small generated dataset: prompt texts of both protocols, answers against an independent
computation with transformers' logits, aggregation by hand, bad data, and the CLI end to end."""

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import checkpoints
import mistral_fn as mf
from mistral_fn.evaluation import mmlu
from mistral_fn.generate import next_token_logits
from mistral_fn.tokenizer import load_tokenizer
from mistral_fn.atomic import check_file_target
from tests.hf_reference import hf_model
from tests.snapshots import contents, one_line

CONFIG = mf.MistralConfig(vocab_size=32000, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                          max_seq_len=512, sliding_window=None)
DEV = {
    "abstract_algebra": [["What is 1+1?", "1", "2", "3", "4", "B"], ["Find the order of Z_4.", "4", "2", "1", "8", "A"]],
    "sociology": [["Who wrote 'Suicide'?", "Weber", "Marx", "Durkheim", "Comte", "C"],
                  ["Norms are:", "laws", "rules, formal or not", "customs only", "none", "B"]],
    "world_religions": [["The Torah has how many books?", "3", "4", "5", "7", "C"],
                        ["Mecca is in:", "Saudi Arabia", "Iran", "Egypt", "Iraq", "A"]],
}
TEST = {
    "abstract_algebra": [["Is Z_5 a field?", "Yes", "No", "Only mod 2", "Unknown", "A"],
                         ["Order of S_3?", "3", "6", "9", "12", "B"],
                         ["  Index of A_n in S_n, for n > 1?", "1", "n", "2", "n!", "C"]],
    "sociology": [["Anomie means, in short:", "normlessness", "wealth", "ritual", "class, \"caste\"", "A"],
                  ["Who coined 'sociology'?", "Marx", "Spencer", "Weber", "Comte", "D"]],
    "world_religions": [["The Analects are attributed to:", "Laozi", "Confucius", "Mencius", "Buddha", "B"]],
}


def write_split(root, split, rows_by_subject):
    (root / split).mkdir(parents=True, exist_ok=True)
    for subject, rows in rows_by_subject.items():
        with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)


@pytest.fixture
def data(tmp_path):
    write_split(tmp_path / "mmlu", "dev", DEV)
    write_split(tmp_path / "mmlu", "test", TEST)
    return tmp_path / "mmlu" / "test"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def params(tokenizer):
    """A tiny random model whose head strongly prefers the letter tokens and whose attention is strong
    enough that the chosen letter depends on the question, not only on the prompt's last token."""
    params = mf.init_params(CONFIG, seed=3)
    letters = [tokenizer.sp.piece_to_id(p) for c in mmlu.CHOICES for p in (c, "▁" + c)]
    params["output"][letters] *= 300
    for layer in params["layers"]:
        for name, scale in (("wq", 5), ("wk", 5), ("wv", 10), ("wo", 10)):
            layer["attn"][name] *= scale
    return params


def logits_fn(params):
    return lambda prompts: next_token_logits(params, prompts, CONFIG)


# ---- data and prompts -----------------------------------------------------------------------------

def test_load_reads_rows_and_dev_split(data):
    test, dev = mmlu.load_mmlu(data, 2)
    assert list(test) == ["abstract_algebra", "sociology", "world_religions"]
    q = test["sociology"][0]
    assert (q.index, q.question, q.choices, q.answer) == (0, "Anomie means, in short:",
                                                          ("normlessness", "wealth", "ritual", 'class, "caste"'), "A")
    assert [d.question for d in dev["sociology"]] == ["Who wrote 'Suicide'?", "Norms are:"]
    assert mmlu.load_mmlu(data, 1)[1]["sociology"] == dev["sociology"][:1]


def test_modellink_prompt_text(data):
    test, dev = mmlu.load_mmlu(data, 2)
    expected = (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n"
        "Find the order of Z_4.\nA. 4\nB. 2\nC. 1\nD. 8\nAnswer: A\n\n"
        "  Index of A_n in S_n, for n > 1?\nA. 1\nB. n\nC. 2\nD. n!\nAnswer:")
    assert mmlu.modellink_prompt(test["abstract_algebra"][2], dev["abstract_algebra"]) == expected


def test_harness_prompt_text(data):
    test, dev = mmlu.load_mmlu(data, 2)
    expected = (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Find the order of Z_4.\nA. 4\nB. 2\nC. 1\nD. 8\nAnswer: A\n\n"
        "Index of A_n in S_n, for n > 1?\nA. 1\nB. n\nC. 2\nD. n!\nAnswer:")
    assert mmlu.harness_prompt(test["abstract_algebra"][2], dev["abstract_algebra"]) == expected
    assert mmlu.harness_prompt(test["abstract_algebra"][2], []) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Index of A_n in S_n, for n > 1?\nA. 1\nB. n\nC. 2\nD. n!\nAnswer:")


def test_prompt_ids_wrap_chat_template(data, tokenizer):
    test, dev = mmlu.load_mmlu(data, 2)
    q = test["sociology"][1]
    ids, shots, text = mmlu.fitted_prompt(tokenizer, "modellink", q, dev["sociology"], 512, "mistral")
    assert shots == 2 and ids == [1] + tokenizer.encode("[INST] " + text + " [/INST]")
    ids, _, text = mmlu.fitted_prompt(tokenizer, "harness", q, dev["sociology"], 512, "mistral")
    assert ids == [1] + tokenizer.encode(text)


def test_long_prompt_drops_examples_then_fails(data, tokenizer):
    test, dev = mmlu.load_mmlu(data, 2)
    q, shots = test["sociology"][0], dev["sociology"]
    lengths = [len(mmlu.fitted_prompt(tokenizer, "harness", q, shots[:k], 10**6, None)[0]) for k in range(3)]
    assert lengths[0] < lengths[1] < lengths[2]
    assert mmlu.fitted_prompt(tokenizer, "harness", q, shots, lengths[1] + 1, None)[1] == 1
    assert mmlu.fitted_prompt(tokenizer, "harness", q, shots, lengths[0] + 1, None)[1] == 0
    with pytest.raises(mf.InputError, match="sociology question 0: .* do not fit the context of"):
        mmlu.fitted_prompt(tokenizer, "harness", q, shots, lengths[0], None)


def test_modellink_answer_extraction():
    assert mmlu.modellink_answer("  B. because") == "B"
    assert mmlu.modellink_answer("C") == "C"
    assert mmlu.modellink_answer("The answer is D.") == "D"
    assert mmlu.modellink_answer("Answer") == "A"  # the seed's second regex takes a leading letter
    assert mmlu.modellink_answer("") is None
    assert mmlu.modellink_answer("x") is None


# ---- scoring against transformers ----------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["modellink", "harness"])
def test_answers_equal_transformers_computation(data, tokenizer, params, protocol):
    test, dev = mmlu.load_mmlu(data, 2)
    results = mmlu.evaluate(logits_fn(params), tokenizer, test, dev, protocol=protocol, max_len=512, batch_size=4)
    model = hf_model(CONFIG, params)
    letter_ids = [tokenizer.encode("Answer: " + c)[-1] for c in mmlu.CHOICES]
    expected = []
    for subject, questions in test.items():
        for q in questions:
            if protocol == "modellink":
                text = mmlu.modellink_prompt(q, dev[subject])
                ids = [1] + tokenizer.encode("[INST] " + text + " [/INST]")
            else:
                ids = [1] + tokenizer.encode(mmlu.harness_prompt(q, dev[subject]))
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            if protocol == "modellink":
                first = tokenizer.decode([int(logits.argmax())]).lstrip()[:1]
                expected.append(first if first and first in "ABCD" else None)
            else:
                expected.append(mmlu.CHOICES[int(logits[letter_ids].argmax())])
    predicted = [p["prediction"] for p in results["predictions"]]
    assert predicted == expected
    assert len(set(predicted)) > 1  # the stub model is not constant
    assert results["accuracy"] == sum(p == q[5] for p, q in zip(predicted, sum(TEST.values(), []))) / 6


def test_batching_does_not_change_predictions(data, tokenizer, params):
    test, dev = mmlu.load_mmlu(data, 2)
    run = lambda b: mmlu.evaluate(logits_fn(params), tokenizer, test, dev, protocol="harness", max_len=512,
                                  batch_size=b)["predictions"]
    one, three = run(1), run(3)
    for a, b in zip(one, three):
        assert a["prediction"] == b["prediction"]
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)


def test_aggregation_by_hand():
    rows = [("abstract_algebra", 1), ("abstract_algebra", 0), ("abstract_algebra", 1), ("sociology", 1),
            ("my_subject", 0), ("my_subject", 0), ("my_subject", 1), ("my_subject", 0)]
    result = mmlu.aggregate([{"subject": s, "correct": bool(c)} for s, c in rows])
    assert result["n"] == 8
    assert result["accuracy"] == 4 / 8
    assert result["macro_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 4) / 3)
    assert result["subjects"]["abstract_algebra"] == {"n": 3, "correct": 2, "accuracy": 2 / 3, "category": "STEM"}
    assert result["subjects"]["my_subject"]["category"] == "uncategorized"
    assert {k: v["accuracy"] for k, v in result["categories"].items()} == {
        "STEM": 2 / 3, "social sciences": 1.0, "uncategorized": 1 / 4}


def test_category_map_is_the_standard_57():
    assert len(mmlu.SUBJECT_CATEGORIES) == 57
    counts = {c: list(mmlu.SUBJECT_CATEGORIES.values()).count(c) for c in set(mmlu.SUBJECT_CATEGORIES.values())}
    assert counts == {"STEM": 18, "humanities": 13, "social sciences": 12, "other": 14}


# ---- bad data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("row, match", [(["q", "a", "b", "c", "d"], "line 3: expected 6 columns"),
                                        (["q", "a", "b", "c", "d", "E"], "line 3: answer 'E' is not one of")])
def test_malformed_rows(data, row, match):
    path = data / "sociology_test.csv"
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(row)
    with pytest.raises(mf.InputError, match=f"sociology_test.csv: {match}"):
        mmlu.load_mmlu(data, 0)


SOCIOLOGY = '"Anomie means, in short:",normlessness,wealth,ritual,"class, ""caste""",A\r\n'.encode()


@pytest.mark.parametrize("content, match", [
    (SOCIOLOGY + "Qui a créé la sociologie ?,Marx,Spencer,Weber,Comte,D\n".encode("latin-1"),
     rf"line 2: not UTF-8 \(byte {len(SOCIOLOGY) + 8} is 0xe9\); save the file as UTF-8"),
    ("Anomie?,a,b,c,d,A\n".encode("utf-16"), r"line 1: not UTF-8 \(byte 0 is 0xff\)"),
    (SOCIOLOGY + b'"' + b"x" * 200_000 + b'",a,b,c,d,A\n', r"line 2: malformed CSV \(field larger than field limit"),
])
def test_csv_that_is_not_utf8_or_malformed_is_one_line_naming_the_file(data, content, match):
    path = data / "sociology_test.csv"
    path.write_bytes(content)
    before = contents(data.parent)
    with pytest.raises(mf.InputError, match=f"{path}: {match}") as caught:
        mmlu.load_mmlu(data, 0)
    one_line(caught.value)
    assert contents(data.parent) == before


def test_utf8_bom_and_a_directory_named_like_a_csv(data):
    (data / "sociology_test.csv").write_bytes(b"\xef\xbb\xbf" + SOCIOLOGY + b"\n\n")
    (data / "zoology_test.csv").mkdir()  # not a file: not a subject
    test, _ = mmlu.load_mmlu(data, 0)
    assert [(q.question, q.choices[3]) for q in test["sociology"]] == [("Anomie means, in short:", 'class, "caste"')]
    assert "zoology" not in test


def test_non_finite_logits_stop_the_evaluation(data, tokenizer, params):
    test, dev = mmlu.load_mmlu(data, 1)
    broken = dict(params, norm=params["norm"] * float("nan"))
    for protocol in mmlu.PROTOCOLS:
        with pytest.raises(mf.InputError, match=r"logits row 0 of 2 is not finite \(NaN\)") as caught:
            mmlu.evaluate(logits_fn(broken), tokenizer, test, dev, protocol=protocol, max_len=512, batch_size=2)
        one_line(caught.value)


def test_results_path_is_checked_before_any_work(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "a_file").write_text("x")
    before = contents(tmp_path)
    for path, match in ((tmp_path / "results", "results: is a directory; expected a file path to write"),
                        (tmp_path / "a_file" / "mmlu.json", "mmlu.json: cannot be written")):
        with pytest.raises(mf.CheckpointError, match=match) as caught:
            check_file_target(path)
        one_line(caught.value)
    check_file_target(tmp_path / "new" / "dir" / "mmlu.json")  # creatable: fine, and nothing is created yet
    assert contents(tmp_path) == before


def test_missing_data(tmp_path, data):
    with pytest.raises(mf.InputError, match="MMLU data directory not found"):
        mmlu.load_mmlu(tmp_path / "nope", 0)
    with pytest.raises(mf.InputError, match="no <subject>_test.csv files"):
        mmlu.load_mmlu(tmp_path, 0)
    (data.parent / "dev" / "sociology_dev.csv").unlink()
    with pytest.raises(mf.InputError, match="sociology: no dev split"):
        mmlu.load_mmlu(data, 1)
    with pytest.raises(mf.InputError, match="2 dev questions, num_fewshot=3"):
        mmlu.load_mmlu(data, 3)


# ---- the CLI ------------------------------------------------------------------------------------------

def run_cli(*args, nproc=1):
    """The evaluate script, under torchrun (a TP mesh of `nproc` gloo ranks) when `nproc` > 1."""
    launcher = [sys.executable]
    if nproc > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]
    return subprocess.run([*launcher, "-m", "experiments.evaluate", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_cli_end_to_end(data, tokenizer, params, tmp_path, nproc):
    """One process, and TP=2 under torchrun (rank 0 writes): the same predictions as in-process scoring."""
    checkpoints.save_hf(tmp_path / "hf", CONFIG, params)
    results_path = tmp_path / "out" / "mmlu.json"
    out = run_cli("--task=mmlu", f"--data_path={data}", f"--load={tmp_path / 'hf'}", "--protocol=harness",
                  "--num_fewshot=1", "--batch_size=2", f"--results_path={results_path}", "--device=cpu", nproc=nproc)
    assert out.returncode == 0, out.stderr
    saved = json.loads(results_path.read_text())
    test, dev = mmlu.load_mmlu(data, 1)
    expected = mmlu.evaluate(logits_fn(params), tokenizer, test, dev, protocol="harness", max_len=512)
    assert saved["accuracy"] == expected["accuracy"]
    for got, want in zip(saved["predictions"], expected["predictions"], strict=True):
        assert got["prediction"] == want["prediction"]
        assert got["loglikelihoods"] == pytest.approx(want["loglikelihoods"], abs=1e-4)
    assert set(saved) >= {"accuracy", "macro_accuracy", "subjects", "categories", "predictions"}
    assert saved["subjects"]["sociology"]["n"] == 2 and saved["protocol"] == "harness"
    assert "total (micro)" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("args, match", [(["--protocol=mcq"], "--protocol='mcq'"),
                                         (["--task=gsm8k"], "only 'mmlu'"),
                                         (["--data_path=/nonexistent"], "MMLU data directory not found")])
def test_cli_bad_input(data, args, match):
    out = run_cli(f"--data_path={data}", "--load=/nonexistent", *args)
    assert out.returncode == 1 and match in out.stderr and len(out.stderr.strip().splitlines()) == 1
