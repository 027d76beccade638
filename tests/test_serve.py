"""``lmlab serve`` driven over HTTP on 127.0.0.1 by the official ``openai`` client: the same
text as ``lmlab generate`` with the same options and seed, streaming and not; errors."""

import contextlib
import io
import json
import threading
import time
import typing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="lmlab serve needs fastapi and uvicorn: pip install 'lmlab[serve]'")
pytest.importorskip("uvicorn", reason="lmlab serve needs fastapi and uvicorn: pip install 'lmlab[serve]'")
openai = pytest.importorskip("openai", reason="the serving tests drive the server with the openai package")
httpx = pytest.importorskip("httpx")

from serve_helpers import live_server, make_checkpoint  # noqa: E402

from lmlab.checkpoints import load_checkpoint  # noqa: E402
from lmlab.cli import main  # noqa: E402
from lmlab.serve.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def app(checkpoint):
    model, tokenizer = load_checkpoint(str(checkpoint))
    return create_app(model, tokenizer, "tiny", max_batch=16, max_tokens_limit=40, max_body_bytes=4096)


@pytest.fixture(scope="module")
def base_url(app):
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def lmlab_generate(checkpoint, prompt, *flags):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["generate", "--model", str(checkpoint), "--prompt", prompt, "--json", *flags]) == 0
    return json.loads(out.getvalue())["results"][0]


# (request options, the same options as `lmlab generate` flags)
SETUPS = [
    (dict(temperature=0, seed=0), ["--temperature", "0"]),
    (dict(seed=3), ["--seed", "3"]),
    (dict(temperature=0.8, top_p=0.9, seed=5), ["--temperature", "0.8", "--top-p", "0.9", "--seed", "5"]),
    (dict(seed=7, presence_penalty=0.5, frequency_penalty=0.3, extra_body={"top_k": 6, "repetition_penalty": 1.3}),
     ["--seed", "7", "--presence-penalty", "0.5", "--frequency-penalty", "0.3", "--top-k", "6",
      "--repetition-penalty", "1.3"]),
    (dict(seed=3, stop=["w", "zz"]), ["--seed", "3", "--stop", "w", "--stop", "zz"]),
    (dict(seed=4, logit_bias={"5": -100}), ["--seed", "4", "--logit-bias", "5:-100"]),
]


@pytest.mark.parametrize("options,flags", SETUPS, ids=[" ".join(f) for _, f in SETUPS])
def test_completion_text_equals_lmlab_generate(client, checkpoint, options, flags):
    expected = lmlab_generate(checkpoint, "ROMEO:", "--max-new-tokens", "20", *flags)[0]
    response = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, **options)
    choice = response.choices[0]
    assert choice.text == expected["text"]
    assert choice.finish_reason == ("length" if expected["finish_reason"] == "length" else "stop")
    assert response.usage.prompt_tokens == 6
    assert response.usage.completion_tokens == len(expected["token_ids"])
    assert response.usage.total_tokens == 6 + len(expected["token_ids"])
    pieces, reasons = [], []
    for chunk in client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, stream=True, **options):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == expected["text"]
    assert reasons[-1] == choice.finish_reason and set(reasons[:-1]) == {None}


def test_several_samples_and_prompts(client, checkpoint):
    expected = lmlab_generate(checkpoint, "RO", "--max-new-tokens", "12", "--num-samples", "3", "--seed", "11")
    response = client.completions.create(model="tiny", prompt=["RO", "ab"], max_tokens=12, n=3, seed=11)
    assert [c.index for c in response.choices] == list(range(6))
    assert [c.text for c in response.choices[:3]] == [r["text"] for r in expected]
    other = lmlab_generate(checkpoint, "ab", "--max-new-tokens", "12", "--num-samples", "3", "--seed", "11")
    assert [c.text for c in response.choices[3:]] == [r["text"] for r in other]


def test_logprobs_and_echo_agree_with_lmlab(client, checkpoint, base_url):
    expected = lmlab_generate(checkpoint, "ROMEO:", "--max-new-tokens", "8", "--seed", "1")[0]
    response = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=8, seed=1, logprobs=3)
    lp = response.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(expected["logprobs"], abs=1e-5)
    assert all(len(top) == 3 for top in lp.top_logprobs)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert max(top.values()) >= logprob - 1e-6
    # echo with max_tokens=0 scores the prompt: the same numbers as /v1/score
    echoed = client.completions.create(model="tiny", prompt="ROMEO: hi", max_tokens=0, echo=True, logprobs=1)
    score = httpx.post(base_url + "/v1/score", json={"text": "ROMEO: hi"}).json()
    assert echoed.choices[0].text == "ROMEO: hi"
    assert echoed.choices[0].logprobs.token_logprobs[0] is None
    assert echoed.choices[0].logprobs.token_logprobs[1:] == pytest.approx(score["token_logprobs"][1:], abs=1e-5)
    assert score["nll"] == pytest.approx(-sum(score["token_logprobs"][1:]), abs=1e-4)
    assert score["scored_tokens"] == 8 and score["tokens"][0] == "R"


def test_next_token_distribution_before_and_after_processors(base_url):
    body = httpx.post(base_url + "/v1/next-token", json={"prompt": "ROMEO:", "top_n": 5, "top_k": 2}).json()
    probs = [t["prob"] for t in body["tokens"]]
    assert probs == sorted(probs, reverse=True)
    assert body["kept"] == 2
    kept = [t for t in body["tokens"] if t["processed_logprob"] is not None]
    assert [t["id"] for t in kept] == [t["id"] for t in body["tokens"][:2]]
    assert sum(t["processed_prob"] for t in kept) == pytest.approx(1.0, abs=1e-5)
    assert body["processed_entropy"] < body["entropy"]


def test_attention_weights_of_a_layer(base_url):
    body = httpx.post(base_url + "/v1/attention", json={"prompt": "ROMEO", "layer": 1}).json()
    assert body["tokens"] == list("ROMEO")
    weights = torch.tensor(body["weights"])
    assert weights.shape == (2, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5))
    assert float(weights.triu(1).abs().max()) == 0.0  # causal


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


@pytest.mark.parametrize("options,param", [
    (dict(max_tokens=41), "max_tokens"),
    (dict(max_tokens=20, n=3), "n"),
    (dict(max_tokens="many"), "max_tokens"),
    (dict(max_tokens=4, temperature=-1), "temperature"),
    (dict(max_tokens=4, top_p=1.5), "top_p"),
    (dict(max_tokens=4, extra_body={"top_k": 0}), "top_k"),
    (dict(max_tokens=4, extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(max_tokens=4, logprobs=21), "logprobs"),
    (dict(max_tokens=4, stop=5), "stop"),
    (dict(max_tokens=4, logit_bias={"9999": 1}), "logit_bias"),
    (dict(max_tokens=4, prompt="x" * 49), "prompt"),
    (dict(max_tokens=30, prompt="x" * 20), "max_tokens"),
    (dict(max_tokens=4, prompt=""), "prompt"),
])
def test_bad_requests_get_400_naming_the_field(client, options, param):
    options = {"prompt": "RO", **options}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", **options)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param
    assert info.value.body["type"] == "invalid_request_error"


def test_malformed_json_oversized_body_and_unknown_model(base_url):
    r = httpx.post(base_url + "/v1/completions", content=b'{"prompt": "RO",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(base_url + "/v1/completions", content=b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(base_url + "/v1/completions", json={"prompt": "a" * 5000})
    assert r.status_code == 413 and "limit of 4096" in r.json()["error"]["message"]
    r = httpx.post(base_url + "/v1/completions", json={"model": "gpt-4", "prompt": "RO"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = httpx.post(base_url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    assert httpx.get(base_url + "/v1/nothing").status_code == 404


def test_api_key_is_required_when_set(checkpoint):
    model, tokenizer = load_checkpoint(str(checkpoint))
    app = create_app(model, tokenizer, "tiny", api_key="sesame")
    # the key check is the only middleware, a plain ASGI one: streamed chunks are not copied through another task
    assert [m.cls.__name__ for m in app.user_middleware] == ["_RequireKey"]
    with live_server(app) as url:
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model="tiny", prompt="RO", max_tokens=2, seed=0).choices[0].text is not None
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.completions.create(model="tiny", prompt="RO", max_tokens=2)
        assert info.value.status_code == 401
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/").status_code == 200  # the page itself is public


def test_beam_search_requests(client, checkpoint):
    expected = lmlab_generate(checkpoint, "ROMEO:", "--max-new-tokens", "6", "--num-beams", "3", "--num-samples", "2")
    response = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=6, n=2,
                                         extra_body={"num_beams": 3})
    assert [c.text for c in response.choices] == [r["text"] for r in expected]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="RO", max_tokens=6, stream=True, extra_body={"num_beams": 2})
    assert info.value.body["param"] == "stream"


def test_stream_with_usage_and_done(base_url):
    body = {"prompt": "RO", "max_tokens": 5, "seed": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", base_url + "/v1/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"] == [] and last["usage"]["prompt_tokens"] == 2


def test_sixteen_concurrent_clients_get_what_each_gets_alone(client, app):
    requests = [dict(prompt="ROMEO:"[: 1 + i % 6], max_tokens=8 + i % 5, seed=i, temperature=0 if i % 3 == 0 else 0.9)
                for i in range(16)]
    alone = [client.completions.create(model="tiny", **r).choices[0].text for r in requests]
    steps = app.state.server.scheduler.steps
    together = [None] * 16

    def ask(i):
        together[i] = client.completions.create(model="tiny", **requests[i]).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    assert app.state.server.scheduler.steps - steps < sum(r["max_tokens"] for r in requests)  # steps were shared


def test_a_client_that_leaves_mid_stream_frees_its_row(base_url, app, client):
    scheduler = app.state.server.scheduler
    body = {"prompt": "RO", "max_tokens": 40, "seed": 0, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first token
    deadline = time.time() + 30
    while scheduler.running_rows and time.time() < deadline:
        time.sleep(0.05)
    assert scheduler.running_rows == 0
    assert client.completions.create(model="tiny", prompt="RO", max_tokens=3, seed=0).choices[0].finish_reason


def test_field_names_are_the_openai_package_types(base_url):
    from openai.types import Completion, CompletionChoice, CompletionCreateParams, CompletionUsage
    from openai.types.chat import CompletionCreateParams as ChatParams
    from openai.types.completion_choice import Logprobs

    from lmlab.serve.app import _EXTRA_FIELDS, CHAT_FIELDS, COMPLETION_FIELDS

    def fields(union):
        return set().union(*(typing.get_type_hints(t) for t in typing.get_args(union)))

    assert set(COMPLETION_FIELDS) - set(_EXTRA_FIELDS) <= fields(CompletionCreateParams)
    assert set(CHAT_FIELDS) - set(_EXTRA_FIELDS) <= fields(ChatParams)
    body = httpx.post(base_url + "/v1/completions", json={"prompt": "RO", "max_tokens": 3, "seed": 0, "logprobs": 2,
                                                          "echo": True}).json()
    assert set(body) <= set(Completion.model_fields)
    assert set(body["choices"][0]) <= set(CompletionChoice.model_fields)
    assert set(body["choices"][0]["logprobs"]) <= set(Logprobs.model_fields)
    assert set(body["usage"]) <= set(CompletionUsage.model_fields)
    # (the first echoed token has no log-probability: null, as the OpenAI API and vLLM answer)
    plain = httpx.post(base_url + "/v1/completions", json={"prompt": "RO", "max_tokens": 3, "seed": 0,
                                                           "logprobs": 2}).json()
    Completion.model_validate(plain)


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face directory, its tokenizer with a chat template."""
    transformers = pytest.importorskip("transformers")
    from lmlab.tokenizers import BPETokenizer

    text = ("<user>hello there\n<assistant>hello to you\n" * 4 + "the quick brown fox jumps over the lazy dog. ") * 6
    bpe = BPETokenizer.train(text, vocab_size=300)
    directory = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=96, initializer_range=0.3, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(str(directory))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.backend, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return directory


def test_chat_completions_equal_lmlab_generation_on_the_template(chat_model_dir):
    from lmlab.decode.setups import DecodingSetup, run_setup
    from lmlab.hf import chat_ids

    model, tokenizer = load_checkpoint(f"hf:{chat_model_dir}")
    messages = [{"role": "user", "content": "hello there"}]
    prompt = chat_ids(tokenizer, messages)
    app = create_app(model, tokenizer, "chat", max_batch=4, convert_hf=False)
    assert app.state.server.scheduler.policy == "one request at a time"  # a Hugging Face cache does not merge
    assert app.state.server.served_as == "the Hugging Face model as it is (conversion turned off)"
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for options, setup in [(dict(temperature=0, seed=0), "greedy"), (dict(seed=5, top_p=0.9), "top-p 0.9")]:
            expected = run_setup(model, tokenizer, [prompt], DecodingSetup.parse(setup), 12, seed=options["seed"])[0][0]
            response = client.chat.completions.create(model="chat", messages=messages, max_tokens=12, **options)
            assert response.choices[0].message.role == "assistant"
            assert response.choices[0].message.content == expected.text
            assert response.usage.prompt_tokens == len(prompt)
            deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="chat", messages=messages, max_tokens=12, stream=True, **options)]
            assert "".join(deltas) == expected.text
        choice = client.chat.completions.create(model="chat", messages=messages, max_tokens=4, seed=1,
                                                logprobs=True, top_logprobs=2).choices[0]
        logprobs = choice.logprobs.content
        # each token's bytes, parts of characters included, join to the message
        assert b"".join(bytes(t.bytes) for t in logprobs).decode("utf-8", "replace") == choice.message.content
        assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in logprobs)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="chat", messages=[{"role": "user"}], max_tokens=4)
        assert info.value.body["param"] == "messages"


@pytest.fixture(scope="module")
def gpt2_model_dir(tmp_path_factory):
    """A tiny GPT-2 saved as a Hugging Face directory with a byte-level BPE tokenizer."""
    transformers = pytest.importorskip("transformers")
    from lmlab.tokenizers import BPETokenizer

    bpe = BPETokenizer.train("the quick brown fox jumps over the lazy dog. " * 20 + "ROMEO: hello there\n" * 10,
                             vocab_size=300)
    directory = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=bpe.vocab_size, n_positions=96, n_embd=32, n_layer=2, n_head=4,
                                     initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(str(directory))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>").save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hf_models_are_converted_for_continuous_batching(arch, chat_model_dir, gpt2_model_dir):
    """An hf: GPT-2 or Llama is served as lmlab's transformer: transformers' logits, the tokens of
    lmlab generate on the Hugging Face model itself (greedy and seeded), the same alone or 16 at once."""
    from lmlab.decode.setups import DecodingSetup, run_setup

    directory = chat_model_dir if arch == "llama" else gpt2_model_dir
    model, tokenizer = load_checkpoint(f"hf:{directory}")
    app = create_app(model, tokenizer, arch, max_batch=16, max_tokens_limit=40)
    server = app.state.server
    assert server.scheduler.policy == "continuous batching"
    assert server.served_as == f"lmlab's transformer, converted from the Hugging Face {arch} model"
    prompts = [tokenizer.encode(t) for t in ("hello there", "the quick", "o", "ROMEO: the lazy dog")]
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            torch.testing.assert_close(server.model.next_token_logits(ids)[0], model.hf(ids).logits[:, -1],
                                       atol=1e-4, rtol=0)
    requests = [dict(prompt=prompts[i % 4], max_tokens=6 + i % 7, seed=i, temperature=0 if i % 3 == 0 else 0.9,
                     top_p=1.0 if i % 2 else 0.9) for i in range(16)]
    expected = []
    for r in requests:
        setup = DecodingSetup(temperature=r["temperature"], top_p=r["top_p"])
        result = run_setup(model, tokenizer, [r["prompt"]], setup, r["max_tokens"], seed=r["seed"])[0][0]
        expected.append(result.text)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        alone = [client.completions.create(model=arch, **r).choices[0].text for r in requests]
        together = [None] * 16

        def ask(i):
            together[i] = client.completions.create(model=arch, **requests[i]).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        info = httpx.get(url + "/v1/info").json()
    assert alone == expected
    assert together == alone
    assert info["policy"] == "continuous batching" and arch in info["served_as"]


def test_hf_models_that_do_not_convert_are_served_as_they_are(chat_model_dir):
    from lmlab.hf import HFModel
    from lmlab.serve.app import serving_model

    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=64,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = HFModel(transformers.LlamaForCausalLM(config).eval())
    served, how = serving_model(model)
    assert served is model
    assert how.startswith("the Hugging Face model as it is (") and "rope type 'linear'" in how


def test_word_level_text_keeps_the_spaces_between_words(tmp_path):
    """Streamed deltas and whole texts are what the tokens add after the prompt (a leading space
    for a word tokenizer), as ``lmlab generate`` prints them."""
    from lmlab.models import build_model, save_model
    from lmlab.tokenizers import WordTokenizer, text_offsets

    tok = WordTokenizer.train("the cat sat on the mat and the dog ran to the cat")
    torch.manual_seed(0)
    model = build_model("transformer", dict(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    save_model(model, tmp_path / "words")
    tok.save(tmp_path / "words" / "tokenizer.json")
    expected = lmlab_generate(tmp_path / "words", "the cat", "--max-new-tokens", "6", "--seed", "2",
                              "--logit-bias", f"{tok.eos_id}:-100")[0]
    assert expected["text"].startswith(" ")
    model, tokenizer = load_checkpoint(str(tmp_path / "words"))
    with live_server(create_app(model, tokenizer, "words")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        options = dict(model="words", prompt="the cat", max_tokens=6, seed=2, logit_bias={str(tok.eos_id): -100})
        assert client.completions.create(**options).choices[0].text == expected["text"]
        assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **options)) == expected["text"]
        # text_offset: where each token's text (with its space) begins in the echoed text, whole and streamed
        whole = client.completions.create(echo=True, logprobs=0, **options).choices[0]
        assert whole.text == "the cat" + expected["text"]
        offsets = text_offsets(tok, [], tok.encode(whole.text))
        assert offsets[:3] == [0, 3, 7] and whole.logprobs.text_offset == offsets
        streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, echo=True, logprobs=0,
                                                                                  **options)]
        assert [o for lp in streamed if lp is not None for o in lp.text_offset] == offsets


def _children(pid: int) -> list[int]:
    from pathlib import Path

    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


@pytest.mark.parametrize("precision", [[], ["--dtype", "bfloat16", "--quantize", "int4"]])
def test_lmlab_serve_decodes_in_its_own_process_and_leaves_none_behind(checkpoint, precision):
    """The command's decoding process answers as ``lmlab generate`` with the same precision flags
    (bfloat16 + int4 changes this text: the flags are applied), and ends with the server (Ctrl-C)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from test_serve_worker import wait_gone

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[1] / "src")
    server = subprocess.Popen([sys.executable, "-m", "lmlab", "serve", "--model", str(checkpoint), "--port", str(port),
                               *precision],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONPATH": src})
    try:
        assert "continuous batching" in server.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/v1/models").status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.time() < deadline and server.poll() is None
                time.sleep(0.1)
        children = _children(server.pid)  # the decoding process (and multiprocessing's resource tracker)
        assert any(b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes() for c in children)
        expected = lmlab_generate(checkpoint, "ROMEO:", "--max-new-tokens", "12", "--seed", "4", *precision)[0]["text"]
        body = {"prompt": "ROMEO:", "max_tokens": 12, "seed": 4}
        assert httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"] == expected
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0
        assert all(wait_gone(c) for c in children)
    finally:
        server.kill()


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(4, 30), min_size=1, max_size=20), prompt=st.lists(st.integers(4, 30), max_size=4),
       stop=st.lists(st.text("abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=3), max_size=3))
def test_streamed_deltas_never_pass_the_final_text(ids, prompt, stop):
    """The deltas of a streamed row are a prefix of its final text (cut before a stop string),
    whatever token ends it: never a character of the stop string."""
    from lmlab.decode.generate import StopScan, StreamedRow, finished_text
    from lmlab.tokenizers import CharTokenizer

    from serve_helpers import TEXT

    tok = CharTokenizer.train(TEXT)
    row, scan = StreamedRow(tok, prompt, stop, tok.eos_id), StopScan(tok, prompt, stop) if stop else None
    sent, reason = "", "length"
    for k, t in enumerate(ids, 1):
        sent += row.add(t)
        if scan is not None and scan.add(t):
            reason = "stop"
            break
    final = finished_text(tok, prompt, ids[:k], reason, stop)
    assert final.startswith(sent)
    assert sent + row.rest(final) == final
