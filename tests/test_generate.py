"""KV cache, sampling and generation: cached decoding against uncached recompute and against
transformers' `generate`, the ring buffer past the window, sampling filters, stops and streaming."""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils import _pytree as pytree

import checkpoints
import mistral_fn as mf
import sharding as sh
from mistral_fn import kv_cache, sampling
from mistral_fn.generate import decode_logits, generate, generate_stream, left_pad, next_token_logits, stream_text
from mistral_fn.model import forward_with_cache
from mistral_fn.tokenizer import load_tokenizer
from tests.hf_reference import hf_model
from tests.snapshots import one_line

SMALL = mf.MistralConfig(vocab_size=257, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=80, head_dim=16,
                         rope_theta=1e4, sliding_window=None, max_seq_len=128)
# The real tokenizer's vocabulary, for stop strings and the CLI.
WORDS = mf.MistralConfig(vocab_size=32000, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                         max_seq_len=256, sliding_window=16)


def decisive_params(config, seed=0):
    """Random weights with a sharpened output head, so greedy choices have clear margins (no near-ties
    that float noise could flip between implementations)."""
    params = mf.init_params(config, seed=seed)
    params["output"] = params["output"] * 50
    return params


def random_prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- the cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_cached_decoding_equals_recompute(window, chunk):
    """Prompts of 7 and 4 tokens (left-padded), prefilled in chunks, then 10 decoded tokens: every step's
    logits equal a full uncached forward of that row alone. With window 4 the ring wraps many times."""
    config = SMALL.replace(sliding_window=window)
    params = decisive_params(config)
    prompts = random_prompts([7, 4], config.vocab_size)
    tokens, positions = left_pad(prompts, config.eos_id)
    cache = kv_cache.init_cache(params, config, 2, tokens.shape[1] + 10)
    for start in range(0, tokens.shape[1], chunk):
        logits, cache = forward_with_cache(params, tokens[:, start:start + chunk], config, cache,
                                           positions[:, start:start + chunk])
    rows = [list(p) for p in prompts]
    for step in range(11):
        for b, row in enumerate(rows):
            reference = mf.forward(params, torch.tensor([row]), config)[0, -1]
            torch.testing.assert_close(logits[b, -1], reference, atol=1e-4, rtol=0)
        if step == 10:
            break
        next_ids = logits[:, -1].argmax(-1)
        for row, token in zip(rows, next_ids.tolist()):
            row.append(token)
        positions = positions[:, -1:] + 1
        logits, cache = forward_with_cache(params, next_ids[:, None], config, cache, positions)
    if window is not None:
        assert cache["k"][0].shape[1] == window


def test_compiled_decode_equals_eager():
    """`torch.compile`d decode steps (in-place cache writes inside the graph) past a window of 4."""
    config = SMALL.replace(n_layers=1, sliding_window=4)
    params = decisive_params(config)
    prompts = random_prompts([6, 3], config.vocab_size)
    eager = generate(params, prompts, config, max_new_tokens=8, stop_ids=())
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert generate(params, prompts, config, max_new_tokens=8, stop_ids=(), compile_decode=True) == eager
    assert counters["stats"]["unique_graphs"] >= 1


@pytest.mark.parametrize("window", [None, 4])
def test_first_chunk_without_padding_attends_over_its_own_keys_without_a_mask(window, monkeypatch):
    """A fresh cache and unpadded rows: causal attention by index (flash / sliding-window blocks), no position
    mask; the logits equal the uncached forward and the cache continues as with the masked path."""
    from mistral_fn import attention
    config = SMALL.replace(sliding_window=window)
    params = decisive_params(config)
    tokens = torch.tensor(random_prompts([9, 9], config.vocab_size))
    masks = []
    rows = attention.KeyMask.rows
    monkeypatch.setattr(attention.KeyMask, "rows", lambda self, i, j: masks.append(j - i) or rows(self, i, j))
    cache = kv_cache.init_cache(params, config, 2, 12)
    logits, cache = forward_with_cache(params, tokens, config, cache, torch.arange(9).expand(2, 9))
    assert masks == []
    torch.testing.assert_close(logits, mf.forward(params, tokens, config), rtol=1e-5, atol=1e-5)
    masked = kv_cache.init_cache(params, config, 2, 12)
    _, masked = forward_with_cache(params, tokens[:, :1], config, masked, torch.zeros(2, 1, dtype=torch.long))
    _, masked = forward_with_cache(params, tokens[:, 1:], config, masked, torch.arange(1, 9).expand(2, 8))
    assert masks and torch.equal(cache["pos"], masked["pos"])
    for a, b in zip(cache["k"] + cache["v"], masked["k"] + masked["v"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [None, 4])
def test_a_non_finite_key_weight_is_not_hidden_by_the_flash_kernel(window):
    """The causal flash kernel returns 0 where all of a query's scores are NaN; the unmasked prefill (and the
    uncached forward without autograd) must still give NaN logits, which generation refuses."""
    config = SMALL.replace(sliding_window=window)
    params = decisive_params(config)
    params["layers"][0]["attn"]["wk"][0, 0] = float("nan")
    prompt = random_prompts([9], config.vocab_size)
    assert next_token_logits(params, prompt, config).isnan().all()
    with torch.no_grad():
        assert mf.forward(params, torch.tensor(prompt), config).isnan().all()
    with pytest.raises(mf.InputError, match="not finite"):
        generate(params, prompt, config, max_new_tokens=2)


@pytest.mark.parametrize("window", [None, 4])
def test_compiled_decode_of_one_row_is_one_graph_and_equals_eager(window):
    """Batch 1 (each product is a one-row multiply-reduce under compile): the same tokens and logits within
    1e-5 as eager, from a single compiled graph for every step (`written` is a tensor, not a constant)."""
    torch._dynamo.reset()
    config = SMALL.replace(sliding_window=window)
    params = decisive_params(config)
    prompt = random_prompts([5], config.vocab_size)
    tokens, positions = left_pad(prompt, config.eos_id)
    logits, eager_cache = forward_with_cache(params, tokens, config, kv_cache.init_cache(params, config, 1, 5 + 9),
                                             positions)
    cache = kv_cache.as_decode_cache(pytree.tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, eager_cache))
    compiled = torch.compile(decode_logits, fullgraph=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    token, position = logits[:, -1].argmax(-1, keepdim=True), positions[:, -1:]
    for _ in range(8):
        position = position + 1
        want, eager_cache = decode_logits(params, token, config, eager_cache, position)
        got, cache = compiled(params, token, config, cache, position)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        token = want.argmax(-1, keepdim=True)
    assert counters["stats"]["unique_graphs"] == 1 and int(cache["written"]) == eager_cache["written"] == 5 + 8
    assert generate(params, prompt, config, max_new_tokens=8, stop_ids=(), compile_decode=True) == \
        generate(params, prompt, config, max_new_tokens=8, stop_ids=())


def test_ring_buffer_worked_example():
    """The docstring example: W = S = 4, a 6-token prefill, then two decode steps."""
    config = SMALL.replace(sliding_window=4)
    params = mf.init_params(config)
    cache = kv_cache.init_cache(params, config, 1, 64)
    _, cache = forward_with_cache(params, torch.arange(3, 9)[None], config, cache, torch.arange(6)[None])
    assert cache["pos"].tolist() == [[4, 5, 2, 3]]
    _, cache = forward_with_cache(params, torch.tensor([[9]]), config, cache, torch.tensor([[6]]))
    assert cache["pos"].tolist() == [[4, 5, 6, 3]]
    step = kv_cache.plan_step(cache, torch.tensor([[7]]), config.sliding_window)
    assert step.pos.tolist() == [[4, 5, 6, 7]]
    assert step.mask.rows(0, 1)[0, 0, 0].tolist() == [True, True, True, True]


def test_padding_is_never_attended():
    """A left-padded row gives the same logits whatever the padding tokens are."""
    params = decisive_params(SMALL)
    prompts = random_prompts([6, 2], SMALL.vocab_size)
    assert torch.equal(*(next_token_logits(params, prompts, SMALL.replace(eos_id=pad))[1] for pad in (0, 200)))


def test_full_cache_raises():
    params = mf.init_params(SMALL)
    cache = kv_cache.init_cache(params, SMALL, 1, 4)
    with pytest.raises(mf.InputError, match="kv cache of 4 slots is full"):
        forward_with_cache(params, torch.arange(5)[None], SMALL, cache, torch.arange(5)[None])


# ---- generation against transformers ---------------------------------------------------------

def hf_greedy(config, params, prompts, new_tokens, **options):
    model = hf_model(config, params)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None, **options)
    return out[:, width:].tolist()


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("lengths", [[9], [5, 9, 2]])
def test_greedy_equals_transformers(window, lengths):
    """32 greedy tokens; window 6 is shorter than prompt + output, so the ring wraps."""
    config = SMALL.replace(sliding_window=window)
    params = decisive_params(config)
    prompts = random_prompts(lengths, config.vocab_size)
    ours = generate(params, prompts, config, max_new_tokens=32, stop_ids=(), prefill_chunk=4)
    assert ours == hf_greedy(config, params, prompts, 32)


def test_repetition_penalty_equals_transformers():
    """Batched with left padding (transformers also penalises its pad id 0, which never wins here)."""
    params = decisive_params(SMALL, seed=1)
    prompts = random_prompts([8, 5], SMALL.vocab_size)
    ours = generate(params, prompts, SMALL, max_new_tokens=24, stop_ids=(), repetition_penalty=1.8)
    assert ours == hf_greedy(SMALL, params, prompts, 24, repetition_penalty=1.8)
    assert ours != generate(params, prompts, SMALL, max_new_tokens=24, stop_ids=())


# ---- sampling -------------------------------------------------------------------------------------

def test_sampling_reproducible_for_a_seed():
    params = mf.init_params(SMALL)
    prompts = random_prompts([5, 3], SMALL.vocab_size)
    run = lambda seed: generate(params, prompts, SMALL, max_new_tokens=12, temperature=1.0, seed=seed, stop_ids=())
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_filters_on_hand_built_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert sampling.top_k_filter(logits, 2).tolist() == [[float("-inf"), 3.0, 2.0, float("-inf")]]
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    kept = lambda p: torch.isfinite(sampling.top_p_filter(probs.log(), p)).tolist()[0]
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.79) == [False, True, True, False]
    assert kept(0.81) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    penalised = sampling.apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[True, True, False]]),
                                                  2.0)
    assert penalised.tolist() == [[1.0, -4.0, 1.0]]


def test_top_k_top_p_never_emit_excluded_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 10, generator=g).sort(dim=-1, descending=True).values  # token 0 most likely
    drawn = sampling.sample(logits, temperature=1.5, top_k=3, generator=g)
    assert set(drawn.tolist()) == {0, 1, 2}
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).repeat(4000, 1)
    drawn = sampling.sample(probs.log(), temperature=1.0, top_p=0.7, generator=g)
    assert set(drawn.tolist()) == {0, 1}
    assert torch.equal(sampling.sample(logits, temperature=0.0), torch.zeros(4000, dtype=torch.int64))


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0 .*got inf"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0 .*got nan"),
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(top_k=True), "top_k must be a positive integer or None, got True"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=-0.5), r"top_p must be in \(0, 1\] or None, got -0.5"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number > 0, got inf"),
])
def test_bad_sampling_options(bad, message):
    with pytest.raises(mf.InputError, match=message) as caught:
        generate(mf.init_params(SMALL), [[1, 2]], SMALL, max_new_tokens=2, **bad)
    one_line(caught.value)
    with pytest.raises(mf.InputError, match=message):
        sampling.sample(torch.zeros(1, 5), **{"temperature": 1.0, **bad})


def test_non_finite_logits_are_refused_and_excluded_tokens_are_not():
    inf, nan = float("inf"), float("nan")
    fine = torch.tensor([[0.5, -inf, 2.0], [-inf, -inf, 1.0]])
    assert sampling.sample(fine).tolist() == [2, 2]
    assert sampling.sample(fine, temperature=0.7, generator=torch.Generator().manual_seed(0))[1] == 2
    for row, kind in ((torch.tensor([0.5, nan, 2.0]), "NaN"), (torch.tensor([0.5, inf, 2.0]), r"\+inf"),
                      (torch.tensor([-inf, -inf, -inf]), "-inf for every token")):
        for temperature in (0.0, 1.0):
            message = f"logits row 1 of 3 is not finite \\({kind}\\): the model's weights"
            with pytest.raises(mf.InputError, match=message):
                sampling.sample(torch.stack([fine[0], row, fine[1]]), temperature=temperature)
    with pytest.raises(mf.InputError, match="logits row 0 of 1 is not finite .*repetition_penalty=1e-40 overflows"):
        sampling.sample(torch.tensor([[30.0, 1.0]]), repetition_penalty=1e-40, seen=torch.tensor([[True, False]]))


def test_generation_from_non_finite_weights_is_an_error_not_token_0():
    params = mf.init_params(SMALL)
    params["layers"][1]["mlp"]["w_down"] = params["layers"][1]["mlp"]["w_down"] * float("nan")
    for temperature in (0.0, 0.8):
        with pytest.raises(mf.InputError, match=r"logits row 0 of 2 is not finite \(NaN\)") as caught:
            generate(params, [[5, 6], [7]], SMALL, max_new_tokens=3, temperature=temperature)
        one_line(caught.value)


def test_extreme_temperatures_are_exact():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 10, generator=g) * 4
    logits[:, 3] = float("-inf")  # an excluded token stays excluded at every temperature
    for tiny in (1e-30, 1e-45, 1e-50, 5e-324):  # the limit T -> 0 is greedy
        assert torch.equal(sampling.sample(logits, temperature=tiny, generator=g), logits.argmax(-1))
    for huge in (1e30, 1e300):  # the limit T -> inf is uniform over the allowed tokens
        counts = torch.bincount(sampling.sample(logits, temperature=huge, generator=g), minlength=10)
        assert counts[3] == 0 and all(160 < int(c) < 290 for i, c in enumerate(counts) if i != 3), counts
    params, prompts = decisive_params(SMALL), random_prompts([4, 6], SMALL.vocab_size)
    greedy = generate(params, prompts, SMALL, max_new_tokens=5, stop_ids=())
    assert generate(params, prompts, SMALL, max_new_tokens=5, temperature=1e-45, top_p=0.5, stop_ids=()) == greedy


# ---- stopping and streaming -----------------------------------------------------------------------

def test_eos_stops_and_is_excluded():
    params = decisive_params(SMALL)
    prompt = random_prompts([6], SMALL.vocab_size)[0]
    free = generate(params, [prompt], SMALL, max_new_tokens=16, stop_ids=())[0]
    k = next(i for i in range(2, 16) if free[i] not in free[:i])
    assert generate(params, [prompt], SMALL.replace(eos_id=free[k]), max_new_tokens=16)[0] == free[:k]
    assert generate(params, [prompt], SMALL, max_new_tokens=16, stop_ids=[free[k]])[0] == free[:k]


def test_stop_strings_with_real_tokenizer():
    tokenizer = load_tokenizer()
    params = decisive_params(WORDS)
    prompt = [1] + tokenizer.encode("The weather today")
    free = generate(params, [prompt], WORDS, max_new_tokens=16, stop_ids=())[0]
    k = next(i for i in range(3, 16) if tokenizer.decode(free[:i + 1])[-2:] not in tokenizer.decode(free[:i]))
    stop = tokenizer.decode(free[:k + 1])[-2:]
    stopped = generate(params, [prompt], WORDS, max_new_tokens=16, stop_ids=(), stop_strings=[stop], tokenizer=tokenizer)
    assert stopped[0] == free[:k + 1]
    with pytest.raises(mf.InputError, match="tokenizer"):
        generate(params, [prompt], WORDS, max_new_tokens=2, stop_strings=["x"])


def test_streaming_yields_the_same_tokens():
    params = decisive_params(SMALL)
    prompts = random_prompts([5, 8, 3], SMALL.vocab_size)
    free = generate(params, prompts, SMALL, max_new_tokens=10, stop_ids=())
    eos = free[1][4]  # row 1 stops at step 4 (or earlier if that token came before)
    steps = list(generate_stream(params, prompts, SMALL.replace(eos_id=eos), max_new_tokens=10))
    assert all(len(s) == 3 for s in steps)
    for row in range(3):
        column = [s[row] for s in steps]
        emitted = [t for t in column if t is not None]
        expected = free[row][:free[row].index(eos)] if eos in free[row] else free[row]
        assert emitted == expected
        assert column[:len(emitted)] == emitted and all(t is None for t in column[len(emitted):])


def test_stream_text_concatenates_to_decode():
    tokenizer = load_tokenizer()
    ids = tokenizer.encode("Größe: 3 € — naïve café 😀 ok 㐀 end")  # 㐀 is three byte-fallback tokens
    pieces = list(stream_text(tokenizer, ids))
    assert "".join(pieces) == tokenizer.decode(ids)
    assert len(pieces) > 5 and all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("prompts, match", [([], "no prompts"), ([[1, 2], []], "prompt 1 is empty"),
                                            ([[1] * 120], "exceeds the context of 128")])
def test_bad_prompts(prompts, match):
    with pytest.raises(mf.InputError, match=match):
        generate(mf.init_params(SMALL), prompts, SMALL, max_new_tokens=10)


# ---- tensor parallelism ------------------------------------------------------------------------

# A vocab that needs Megatron padding (1001 -> 1008) and a window shorter than prompt + output.
TP_CONFIG = mf.MistralConfig(vocab_size=1001, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                             sliding_window=5, max_seq_len=64)
TP_PROMPTS = random_prompts([6, 9, 3], TP_CONFIG.vocab_size, seed=2)
TP_SAMPLING = dict(temperature=0.9, top_k=50, top_p=0.9, seed=5)


def _tp_worker(rank, port, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    mesh = sh.Mesh({"tp": 2}, device_type="cpu")
    params = decisive_params(TP_CONFIG)
    local = sh.shard(params, sh.match(params, sh.mistral_rules(TP_CONFIG, 8)), mesh.shape, mesh.coords)
    greedy = generate(local, TP_PROMPTS, TP_CONFIG, max_new_tokens=12, stop_ids=(), prefill_chunk=4, tp=mesh.tp)
    sampled = generate(local, TP_PROMPTS, TP_CONFIG, max_new_tokens=12, stop_ids=(), tp=mesh.tp, **TP_SAMPLING)
    torch.save({"greedy": greedy, "sampled": sampled}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_tp2_generation_equals_one_device(tmp_path):
    """2 gloo ranks on vocab-sharded logits: the same greedy tokens as TP=1, and the same sampled tokens
    on both ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_tp_worker, args=(port, str(tmp_path)), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.0)):  # True once every worker has exited
        if time.monotonic() >= deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail("TP workers did not finish within 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    params = decisive_params(TP_CONFIG)
    assert ranks[0]["greedy"] == ranks[1]["greedy"] == generate(params, TP_PROMPTS, TP_CONFIG, max_new_tokens=12,
                                                                stop_ids=())
    assert ranks[0]["sampled"] == ranks[1]["sampled"]


# ---- the CLI ----------------------------------------------------------------------------------------

def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "experiments.generate", *args], input=stdin,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def words_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    checkpoints.save_hf(path, WORDS, decisive_params(WORDS))
    return path


@pytest.mark.slow
def test_cli_prompt_and_chat(words_checkpoint):
    tokenizer = load_tokenizer()
    out = run_cli(f"--load={words_checkpoint}", "--prompt=how are you?", "--max_new_tokens=6")
    assert out.returncode == 0, out.stderr
    expected = generate(decisive_params(WORDS), [[1] + tokenizer.encode("[INST] how are you? [/INST] ")], WORDS,
                        max_new_tokens=6)[0]
    assert out.stdout.strip() == tokenizer.decode(expected).strip()
    assert "tokens/s" in out.stderr
    chat = run_cli(f"--load={words_checkpoint}", "--max_new_tokens=3", stdin="hi\nmore\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant> ") == 2


@pytest.mark.slow
@pytest.mark.parametrize("args, match", [(["--prompt_type=chatml"], "unknown chat template 'chatml'"),
                                         (["--load=/nonexistent"], "no such checkpoint")])
def test_cli_bad_input(words_checkpoint, args, match):
    out = run_cli(f"--load={words_checkpoint}", "--prompt=x", *args)
    assert out.returncode == 1 and match in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_vocab_mismatch(tmp_path):
    config = SMALL
    checkpoints.save_hf(tmp_path / "hf", config, mf.init_params(config))
    out = run_cli(f"--load={tmp_path / 'hf'}", "--prompt=x")
    assert out.returncode == 1 and "vocabulary has 257 tokens but the tokenizer" in out.stderr
