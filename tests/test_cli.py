"""experiments.cli: ModelLink spellings read as absl flags, and one-line errors."""

import errno
import json

import pytest
from absl import flags

from experiments.cli import main_guard, normalize_argv
from mistral_fn.errors import CheckpointError


@pytest.fixture
def fv():
    values = flags.FlagValues()
    flags.DEFINE_string("load_dir", None, "", flag_values=values)
    flags.DEFINE_integer("target_tensor_parallel_size", 1, "", flag_values=values)
    flags.DEFINE_bool("no_load_optim", False, "", flag_values=values)
    flags.DEFINE_list("lora_target_modules", [], "", flag_values=values)
    flags.DEFINE_multi_string("stop", [], "", flag_values=values)
    flags.DEFINE_float("lr", 1e-3, "", flag_values=values)
    return values


def test_modellink_spellings_parse_like_absl_ones(fv):
    argv = ["prog", "--load-dir", "./model_from_hf/Mistral-7B/", "--target-tensor-parallel-size", "8",
            "--no-load-optim", "--lora-target-modules", "query_key_value", "dense", "--lr", "-1.25e-6",
            "--stop", "a b", "--stop=c-d"]
    out = normalize_argv(argv, fv)
    assert out == ["prog", "--load_dir", "./model_from_hf/Mistral-7B/", "--target_tensor_parallel_size", "8",
                   "--no_load_optim", "--lora_target_modules=query_key_value,dense", "--lr", "-1.25e-6",
                   "--stop=a b", "--stop=c-d"]
    fv(out)
    assert fv.load_dir == "./model_from_hf/Mistral-7B/" and fv.target_tensor_parallel_size == 8
    assert fv.no_load_optim and fv.lr == -1.25e-6
    assert fv.lora_target_modules == ["query_key_value", "dense"] and fv.stop == ["a b", "c-d"]


def test_values_and_positionals_are_untouched(fv):
    out = normalize_argv(["prog", "--load-dir=a-b--c", "stray-arg", "--", "--not-a-flag"], fv)
    assert out == ["prog", "--load_dir=a-b--c", "stray-arg", "--", "--not-a-flag"]


def test_flagfiles_are_expanded_and_normalised(fv, tmp_path):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("# a comment\n--load-dir=./ckpt\n--lora-target-modules=dense\n--target-tensor-parallel-size=2\n")
    out = normalize_argv(["prog", f"--flagfile={flagfile}", "--target-tensor-parallel-size", "4"], fv)
    fv(out)
    assert fv.load_dir == "./ckpt" and fv.target_tensor_parallel_size == 4 and fv.lora_target_modules == ["dense"]


@pytest.mark.parametrize("error, line", [
    (CheckpointError("ckpt/x: missing metadata file (rank 1)"), "error: ckpt/x: missing metadata file (rank 1)"),
    (OSError(errno.ENOSPC, "No space left on device", "out/data.bin"), "error: out/data.bin: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/file"), "error: /ro/file: Permission denied"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
     "error: input is not UTF-8 text (invalid start byte at byte 0)"),
    (json.JSONDecodeError("Expecting value", "x", 0), "error: Expecting value: line 1 column 1 (char 0)"),
])
def test_main_guard_prints_one_line_and_exits_1(error, line, capsys):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        main_guard(main)(["prog"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == line + "\n"


def test_main_guard_lets_programming_errors_through():
    def main(argv):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        main_guard(main)(["prog"])
