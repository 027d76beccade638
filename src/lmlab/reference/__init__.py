"""lmlab.reference: a second, independent implementation of core computations in plain numpy.

Short enough to read next to the math, and used to check the PyTorch code:

- ``ops``: softmax, log_softmax, softmax_backward, layer_norm, rms_norm, gelu, sigmoid, ...
- ``attention``: ``SelfAttention`` and ``MultiHeadAttention`` with forward and backward,
  and the scaled dot-product core for given Q, K, V and mask (causal, grouped-query):
  ``attention`` (forward) and ``attention_backward`` (dQ, dK, dV);
- ``recurrent``: ``RecurrentLM`` (RNN / GRU / LSTM + dense output) from numpy weights,
  ``from_torch_state_dict``;
- ``bptt``: backpropagation through time by hand for ``RecurrentLM``: ``forward_trace``,
  ``backward`` (every weight, bias, the inputs, the initial state), ``bptt`` (full or
  truncated over windows of k steps), ``hidden_gradient_norms``;
- ``keras``: ``load_keras_h5`` for Keras 2 ``.h5`` files (needs h5py; imported on use);
- ``sequence``: ``sequence_nll``, ``perplexity``, ``sample`` for any step function;
- ``transformer``: ``TransformerLM`` (decoder-only inference with a ``KVCache``), sinusoidal
  and rotary positions;
- ``checkpoint``: ``load_lmlab_checkpoint`` (lmlab transformer / rnn / gru / lstm directories;
  ``read_safetensors`` reads the weights with numpy alone), ``load_npz`` and
  ``from_pytorch_state_dict`` (PyTorch-style names).

Only numpy (and h5py for Keras files) -- never torch.
"""

from lmlab.reference.attention import MultiHeadAttention, SelfAttention, attention, attention_backward
from lmlab.reference.ops import gelu, layer_norm, log_softmax, rms_norm, softmax, softmax_backward
from lmlab.reference.bptt import Gradients, backward, bptt, forward_trace, hidden_gradient_norms
from lmlab.reference.recurrent import GATES, RecurrentLM, from_torch_state_dict, random_weights
from lmlab.reference.sequence import perplexity, sample, sequence_nll, token_nlls
from lmlab.reference.transformer import KVCache, TransformerLM, sinusoidal_encoding, sinusoidal_table
from lmlab.reference.checkpoint import from_pytorch_state_dict, load_lmlab_checkpoint, load_npz


def load_keras_h5(path, dtype=None):
    """A ``RecurrentLM`` from a Keras 2 ``.h5`` file; see ``lmlab.reference.keras``."""
    from lmlab.reference.keras import load_keras_h5 as _load

    return _load(path, dtype=dtype)


__all__ = [
    "GATES",
    "Gradients",
    "KVCache",
    "MultiHeadAttention",
    "RecurrentLM",
    "SelfAttention",
    "TransformerLM",
    "attention",
    "attention_backward",
    "backward",
    "bptt",
    "forward_trace",
    "from_pytorch_state_dict",
    "from_torch_state_dict",
    "gelu",
    "hidden_gradient_norms",
    "layer_norm",
    "load_keras_h5",
    "load_lmlab_checkpoint",
    "load_npz",
    "log_softmax",
    "perplexity",
    "random_weights",
    "rms_norm",
    "sample",
    "sequence_nll",
    "sinusoidal_encoding",
    "sinusoidal_table",
    "softmax",
    "softmax_backward",
    "token_nlls",
]
