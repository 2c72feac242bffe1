"""mistral_fn: Mistral-7B as pure functions over a parameter pytree."""

import os

# torch_npu without CANN breaks `import torch` through backend autoloading; mistral_fn.device
# imports torch_npu explicitly when an NPU is wanted, so autoloading is off unless the user says so.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

from mistral_fn.config import PRESETS, MistralConfig  # noqa: E402
from mistral_fn.errors import CheckpointError, ConfigError, DeviceError, InputError, MistralFnError  # noqa: E402
from mistral_fn.loss import loss_fn, token_losses  # noqa: E402
from mistral_fn.model import forward, hidden_states, output_logits  # noqa: E402
from mistral_fn.parallel import SINGLE_DEVICE, TensorParallel  # noqa: E402
from mistral_fn.params import count_params, init_params, param_shapes  # noqa: E402
from mistral_fn import data, tokenizer  # noqa: E402
from mistral_fn.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from mistral_fn import evaluation, kv_cache, sampling  # noqa: E402
from mistral_fn.generate import generate, generate_stream, next_token_logits, stream_text  # noqa: E402
from mistral_fn.kv_cache import init_cache  # noqa: E402
from mistral_fn.model import forward_with_cache, hidden_states_with_cache  # noqa: E402
from mistral_fn import optim, remat, train  # noqa: E402
from mistral_fn import lora  # noqa: E402
from mistral_fn.train import DivergenceError, TrainState, init_train_state, make_train_step, value_and_grad  # noqa: E402

__all__ = [
    "MistralConfig", "PRESETS", "init_params", "param_shapes", "count_params", "forward", "hidden_states",
    "output_logits", "loss_fn", "token_losses", "TensorParallel", "SINGLE_DEVICE",
    "MistralFnError", "ConfigError", "CheckpointError", "InputError", "DeviceError",
    "data", "tokenizer", "Tokenizer", "load_tokenizer",
    "generate", "generate_stream", "next_token_logits", "stream_text", "init_cache",
    "forward_with_cache", "hidden_states_with_cache", "kv_cache", "sampling", "evaluation",
    "optim", "remat", "train", "make_train_step", "init_train_state", "value_and_grad", "TrainState",
    "DivergenceError",
    "lora",
]
