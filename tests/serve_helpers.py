"""Shared by the serving tests: a tiny checkpoint and a live server on a free loopback port."""

import contextlib
import socket
import threading
import time

import torch

from lmlab.models import build_model, save_model
from lmlab.tokenizers import CharTokenizer

TEXT = "abcdefghijklmnopqrstuvwxyz ROMEO:\n.,!?"


def make_checkpoint(directory, block_size=48, seed=0):
    """A tiny char transformer with peaked (random, std 0.3) weights: no near-ties between tokens."""
    tok = CharTokenizer.train(TEXT)
    torch.manual_seed(seed)
    model = build_model("transformer", dict(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2,
                                            n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    save_model(model, directory)
    tok.save(directory / "tokenizer.json")
    return directory


@contextlib.contextmanager
def live_server(app):
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
