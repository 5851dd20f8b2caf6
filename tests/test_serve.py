"""`python -m modeling_performer.serve`: transformers' own OpenAI-compatible server, driven with the
`openai` client on a loopback port, serving a tiny causal Performer (Hedgehog + window)."""

import concurrent.futures
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from modeling_performer import serve
from modeling_performer.serve import ServeArgumentError, check_serving, expose_classes

from .conftest import ROOT, tiny_config

openai = pytest.importorskip("openai", reason="the serve extra: pip install .[serve]")
psutil = pytest.importorskip("psutil")
pytest.importorskip("fastapi", reason="the serve extra: pip install .[serve]")

QUESTIONS = ["Who is the king of France?", "Sing me a song.", "What is love?", "Where is the duke?",
             "Tell me of the war.", "Is the queen well?", "What news from Rome?", "Speak, what wouldst thou?"]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["one-at-a-time", "continuous-batching"])
def server(request, tiny_chat_folder, tmp_path_factory):
    """-> (base url, folder, model, tokenizer), served one generate() at a time or with continuous
    batching (every test runs against both); at the end the server and the model process it spawned
    are stopped (SIGTERM), and checked to be gone. The server's output goes to a file (a pipe nobody
    reads would fill and stall it)."""
    folder, model, tokenizer = tiny_chat_folder
    flags = ["--continuous-batching"] if request.param == "continuous-batching" else []
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as output:
        try:
            process, url = serve.start(str(folder), "--device", "cpu", *flags, timeout=180, cwd=ROOT, stdout=output,
                                       stderr=subprocess.STDOUT)
        except RuntimeError as error:
            pytest.fail(f"{error}:\n{log.read_text()[-4000:]}")
    family = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    assert len(family) >= 2  # the server and the model's process
    try:
        yield url, folder, model, tokenizer
    finally:
        serve.stop(process, timeout=30)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in family if alive(pid)], "the server left processes behind"


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy(model, tokenizer, question, new_tokens=NEW_TOKENS, **kwargs):
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                             **({"stop_strings": kwargs["stop_strings"], "tokenizer": tokenizer} if kwargs else {}))
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def ask(url, folder, question, **kwargs):
    answer = client(url).chat.completions.create(
        model=str(folder), messages=[{"role": "user", "content": question}],
        **{"max_tokens": NEW_TOKENS, "temperature": 0, **kwargs})
    return answer.choices[0].message.content, answer


def test_chat_answers_equal_greedy_generate_streaming_or_not(server):
    url, folder, model, tokenizer = server
    expected = greedy(model, tokenizer, QUESTIONS[0])
    assert len(set(tokenizer(expected).input_ids)) >= 3  # a varied answer: the comparison means something
    text, answer = ask(url, folder, QUESTIONS[0])
    assert text == expected
    assert answer.usage.completion_tokens == NEW_TOKENS and answer.choices[0].finish_reason == "length"
    stream = client(url).chat.completions.create(
        model=str(folder), messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=NEW_TOKENS,
        temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) >= 2 and "".join(pieces) == expected


def test_completions_equal_greedy_generate(server):
    url, folder, model, tokenizer = server
    prompt = "My lord, the king"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    answer = client(url).completions.create(model=str(folder), prompt=prompt, max_tokens=NEW_TOKENS, temperature=0)
    assert answer.choices[0].text == expected


def test_eight_concurrent_requests_are_all_answered_unchanged(server):
    url, folder, model, tokenizer = server
    expected = [greedy(model, tokenizer, q) for q in QUESTIONS]
    assert len(set(expected)) >= 3
    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(lambda q: ask(url, folder, q)[0], QUESTIONS))
    assert answers == expected


def stream_answer(url, folder, question, max_tokens, delay=0.0):
    time.sleep(delay)
    stream = client(url).chat.completions.create(
        model=str(folder), messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
        stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_sixteen_streaming_clients_arriving_apart_each_get_what_generate_gives_them_alone(server):
    url, folder, model, tokenizer = server
    # prompts of different lengths, answers of different lengths, arrivals spread over a second
    jobs = [(QUESTIONS[i % 8] + " Answer me." * (i // 8), 4 + i, 0.07 * i) for i in range(16)]
    expected = [greedy(model, tokenizer, q, new_tokens=n) for q, n, _ in jobs]
    assert len(set(expected)) >= 8
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: stream_answer(url, folder, *job), jobs))
    assert answers == expected


def leave_mid_stream(url, folder):
    """A streaming request read for two events, then the connection closed: -> the events read."""
    import http.client

    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": str(folder), "messages": [{"role": "user", "content": QUESTIONS[2]}],
                       "max_tokens": 200, "temperature": 0, "stream": True})
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    events = 0
    while events < 2:
        line = response.readline()
        assert line, "the stream ended before two events"
        events += line.startswith(b"data:")
    connection.close()
    return events


def test_a_client_leaving_mid_stream_and_bad_requests_inside_a_running_batch_leave_the_others_unchanged(server):
    url, folder, model, tokenizer = server
    expected = [greedy(model, tokenizer, q) for q in QUESTIONS[3:7]]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        leaving = pool.submit(leave_mid_stream, url, folder)
        answers = [pool.submit(stream_answer, url, folder, q, NEW_TOKENS, 0.05 * i) for i, q in enumerate(QUESTIONS[3:7])]
        too_long = pool.submit(post, url, json.dumps({"model": str(folder), "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": "word " * 400}]}))
        not_json = pool.submit(post, url, "{not json")
        assert leaving.result() == 2
        assert [a.result() for a in answers] == expected
        assert too_long.result()[0] == 400 and not_json.result()[0] == 422
    assert ask(url, folder, QUESTIONS[7])[0] == greedy(model, tokenizer, QUESTIONS[7])  # and the next is served


def test_max_tokens_stop_strings_and_seeded_sampling_behave_as_generate(server):
    url, folder, model, tokenizer = server
    expected = greedy(model, tokenizer, QUESTIONS[1])
    short, answer = ask(url, folder, QUESTIONS[1], max_tokens=3)
    assert answer.usage.completion_tokens == 3 and expected.startswith(short)
    cut = expected.strip().split()[1]  # the second word: the answer stops at it, as generate(stop_strings=) does
    stopped, answer = ask(url, folder, QUESTIONS[1], stop=[cut])
    assert stopped == greedy(model, tokenizer, QUESTIONS[1], stop_strings=[cut])
    assert expected.startswith(stopped) and len(stopped) < len(expected) and stopped.rstrip().endswith(cut)
    assert answer.choices[0].finish_reason == "stop"
    sampled = [ask(url, folder, QUESTIONS[1], temperature=1.5, seed=7)[0] for _ in range(2)]
    assert sampled[0] == sampled[1]
    others = {ask(url, folder, QUESTIONS[1], temperature=1.5, seed=seed)[0] for seed in range(4)}
    assert len(others) >= 2  # sampling does sample


def post(url, body):
    request = urllib.request.Request(url + "/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.parametrize("body", [
    pytest.param({"max_tokens": 4}, id="no-messages"),
    pytest.param('{"messages": [', id="bad-json"),
    pytest.param({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": -3}, id="negative-max-tokens"),
    pytest.param({"messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 4}, id="prompt-too-long"),
])
def test_malformed_requests_get_an_error_status_and_the_next_is_served(server, body):
    url, folder, model, tokenizer = server
    if isinstance(body, dict):
        body = json.dumps({"model": str(folder), **body})
    status, text = post(url, body)
    assert 400 <= status < 600, (status, text)
    if "word word" in body:
        assert status == 400 and "tokens" in text  # the server's own message, not a traceback
    assert ask(url, folder, QUESTIONS[2])[0] == greedy(model, tokenizer, QUESTIONS[2])


# What is refused before the server starts.

def save(tmp_path, head, **overrides):
    from modeling_performer import PerformerForCausalLM, PerformerForConditionalGeneration, PerformerForMaskedLM

    classes = {"causal": PerformerForCausalLM, "masked": PerformerForMaskedLM,
               "seq2seq": PerformerForConditionalGeneration}
    folder = tmp_path / head
    classes[head](tiny_config(**overrides)).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("head,reason", [("masked", "PerformerForMaskedLM"), ("seq2seq", "encoder-decoder")])
def test_a_folder_that_is_not_a_causal_lm_is_refused_with_the_reason(tmp_path, head, reason):
    folder = save(tmp_path, head)
    with pytest.raises(ServeArgumentError, match=reason):
        check_serving(folder)
    done = subprocess.run([sys.executable, "-m", "modeling_performer.serve", folder],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and reason in done.stderr and "causal LM" in done.stderr


def test_a_causal_lm_is_accepted_with_or_without_continuous_batching(tmp_path):
    folder = save(tmp_path, "causal", is_decoder=True)
    check_serving(folder)
    check_serving(None)  # no model named: nothing to check before the server starts


def test_other_models_pass_through_and_no_transformers_name_is_replaced(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    import transformers
    from modeling_performer import PerformerForCausalLM

    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                 intermediate_size=37)).save_pretrained(folder)
    check_serving(str(folder))  # transformers' own model: its own rules
    check_serving(str(folder) + ":model.gguf")
    expose_classes()
    assert transformers.PerformerForCausalLM is PerformerForCausalLM
    assert transformers.LlamaForCausalLM is LlamaForCausalLM


def test_server_benchmark_measures_each_point_once_and_resumes(tiny_chat_folder, tmp_path):
    folder = tiny_chat_folder[0]
    output = tmp_path / "serving_chat.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_chat_server.py"), str(folder), "--labels", "tiny",
               "--contexts", "64", "96", "--clients", "1", "2", "--batching", "off", "on", "--requests", "1",
               "--new-tokens", "4", "--output", str(output)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads(output.read_text())
    rows = saved["results"]
    assert [(r["batching"], r["context"], r["clients"]) for r in rows] == [
        (mode, context, clients) for mode in ("off", "on") for context in (64, 96) for clients in (1, 2)]
    for row in rows:
        assert row["requests"] == row["clients"] and row["generated_per_request"] == row["new_tokens"] == 4
        assert 0 < row["ttft_s_min"] <= row["ttft_s_median"] <= row["ttft_s_p95"] <= row["latency_s_mean"] * 2
        assert row["prompt_tokens"] <= row["context"] - 4 + 8  # the prompt is cut to fit the context
        assert row["peak_rss_mib"] > 100  # the server's processes, model included
        if row["clients"] == 1:  # one request: the union of decoding intervals is its own
            assert row["decode_tokens_per_s_aggregate"] == pytest.approx(row["decode_tokens_per_s_median"], rel=1e-2)
    two = next(r for r in saved["ratios"]["scaling"] if (r["batching"], r["clients"], r["context"]) == ("on", 2, 64))
    one, both = (next(r for r in rows if (r["batching"], r["clients"], r["context"]) == ("on", n, 64)) for n in (1, 2))
    assert two["tokens_per_s_over_one_client"] == pytest.approx(both["tokens_per_s"] / one["tokens_per_s"], rel=1e-2)
    assert output.with_suffix(".png").stat().st_size > 0
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(output.read_text())["results"] == rows  # nothing measured twice
