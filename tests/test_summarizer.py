"""The summarizer on a tiny random model (conf/summarizer/tiny.yaml): prompts, generation, identity."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from itertools import pairwise

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from resume.summarizer.generate import GenerationBackend, GenerationParams
from resume.summarizer.hf_backend import HFBackend
from resume.summarizer.module import SummarizerModule, build_summarizer
from resume.summarizer.prompts import PromptTemplate
from resume.utils.config import CONFIG_DIR, compose_node


def tiny_cfg(seed: int = 0):
    return OmegaConf.create({"seed": seed, "summarizer": compose_node("summarizer", ["summarizer=tiny"])})


@pytest.fixture(scope="module")
def summarizer() -> SummarizerModule:
    return instantiate(tiny_cfg().summarizer)


def make_docs(n: int = 7) -> list[tuple[str, str]]:
    words = ["protein", "cell", "gene", "vaccine", "trial", "dose", "risk", "cohort", "signal", "tumor"]
    return [(f"title {i}", " ".join(words[(i + j) % len(words)] for j in range(3 + 6 * i))) for i in range(n)]


# --------------------------------------------------------------------------- prompts
def test_prompt_uses_chat_template_and_truncates_the_document(summarizer):
    tok, prompt = summarizer.tokenizer, summarizer.prompt
    text = " ".join(f"gene{i} {{braces}}" for i in range(200))  # far over max_doc_tokens; literal braces
    rendered = prompt.render(tok, "My Title", text)
    assert rendered.startswith("<|im_start|>user\n") and rendered.endswith("<|im_start|>assistant\n")
    assert "Title: My Title" in rendered
    kept = rendered.split("Text: ", 1)[1].split("\nThink, write", 1)[0]
    assert text.startswith(kept) and len(kept) < len(text)
    assert len(tok(kept, add_special_tokens=False)["input_ids"]) == prompt.max_doc_tokens
    short = "a short text with {title} inside"
    assert f"Text: {short}\n" in prompt.render(tok, "T", short)  # a document's braces stay literal


def test_prompt_system_message_and_enable_thinking_reach_the_template(summarizer):
    tok = copy.deepcopy(summarizer.tokenizer)
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if enable_thinking is defined and not enable_thinking %}[nothink]{% endif %}"
    )
    p = PromptTemplate(user="Doc: {text}", system="Be brief.", max_doc_tokens=8, enable_thinking=False)
    assert p.render(tok, "", "x y") == "[system]Be brief.[user]Doc: x y[nothink]"
    assert "[nothink]" not in replace(p, enable_thinking=None).render(tok, "", "x y")


def test_few_shot_examples_become_earlier_turns(summarizer):
    p = PromptTemplate(
        user="T: {title}\nD: {text}",
        examples=[{"title": "ex", "text": "example doc", "response": "Topic: x\n</think>\nsum"}],
    )
    msgs = p.messages(summarizer.tokenizer, "real", "real doc")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[0]["content"] == "T: ex\nD: example doc" and msgs[1]["content"].endswith("</think>\nsum")
    assert msgs[2]["content"] == "T: real\nD: real doc"
    with pytest.raises(ValueError, match="examples\\[0\\]"):
        PromptTemplate(user="{text}", examples=[{"title": "x", "text": "y"}])


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIG_DIR / "summarizer").glob("*.yaml")))
def test_summarizer_configs_hold_valid_prompts_and_decoding(name):
    cfg = OmegaConf.create({"seed": 0, "s": compose_node("summarizer", [f"summarizer={name}"])})
    s = OmegaConf.to_container(cfg, resolve=True)["s"]
    assert s["_target_"] == "resume.summarizer.module.build_summarizer"
    prompt = PromptTemplate(**s["prompt"])
    assert (
        "</think>" in prompt.user or prompt.enable_thinking is None
    )  # the format is spelled out or built in
    corpus, rollout = GenerationParams(**s["corpus_generation"]), GenerationParams(**s["rollout_generation"])
    assert not corpus.do_sample and corpus.num_return_sequences == 1  # greedy index, as the paper
    assert rollout.do_sample and rollout.num_return_sequences >= 2  # GRPO groups
    for e in prompt.examples:  # a shown format must be the format the parser reads
        assert s["separator"] in e["response"]


def test_prompt_validation():
    with pytest.raises(ValueError, match="placeholder"):
        PromptTemplate(user="Summarize {title}")
    with pytest.raises(ValueError, match="max_doc_tokens"):
        PromptTemplate(user="{text}", max_doc_tokens=0)


# --------------------------------------------------------------------------- generation
def test_greedy_is_deterministic_and_batching_does_not_change_it(summarizer):
    docs = make_docs()
    tok = summarizer.tokenizer
    side = tok.padding_side
    batched = summarizer.summarize(docs)
    assert summarizer.backend.last_prefix_length >= 8  # tiny.yaml: the tests run the shared-prefix path
    assert [c.token_ids for c in summarizer.summarize(docs)] == [c.token_ids for c in batched]
    single = [summarizer.summarize([d])[0] for d in docs]
    assert [c.token_ids for c in single] == [c.token_ids for c in batched]  # left padding is exact
    reordered = summarizer.summarize(docs[::-1])
    assert [c.token_ids for c in reordered] == [c.token_ids for c in batched][::-1]  # input order kept
    small = HFBackend(summarizer.model, tok, batch_size=2).generate(
        summarizer.prompts_for(docs), summarizer.corpus_generation
    )
    assert [g[0].token_ids for g in small] == [c.token_ids for c in batched]
    assert len({c.text for c in batched}) > 1, (
        "tiny model collapsed to one output; the test would prove nothing"
    )
    assert tok.padding_side == side  # the tokenizer is not mutated
    assert isinstance(summarizer.backend, GenerationBackend)


def test_sampling_returns_k_completions_whose_ids_match_the_text(summarizer):
    docs = make_docs(3)
    params = summarizer.rollout_generation
    k = params.num_return_sequences
    assert params.do_sample and k >= 2
    out = summarizer.summarize(docs, params)
    assert len(out) == k * len(docs)
    eos = set(HFBackend(summarizer.model, summarizer.tokenizer).eos_ids())
    prompts = summarizer.prompts_for(docs)
    for i, c in enumerate(out):
        assert c.prompt_ids == summarizer.tokenizer(prompts[i // k], add_special_tokens=False)["input_ids"]
        assert c.text == summarizer.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert c.finished == (c.token_ids[-1] in eos)
        assert not eos & set(c.token_ids[:-1])  # nothing after the first EOS (no padding)
        assert c.finished or c.num_tokens == params.max_new_tokens
    groups = [[tuple(c.token_ids) for c in out[i * k : (i + 1) * k]] for i in range(len(docs))]
    assert all(len(set(g)) > 1 for g in groups), "k samples of one prompt should differ"
    again = summarizer.summarize(docs, params)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]  # same seed, same samples
    other = summarizer.summarize(docs, replace(params, seed=params.seed + 1))
    assert [c.token_ids for c in other] != [c.token_ids for c in out]


def test_generation_params_validation_and_keys():
    greedy = GenerationParams(max_new_tokens=32)
    assert greedy.key() == replace(greedy, seed=7, temperature=0.3).key() == "greedy-max32"
    sample = GenerationParams(
        do_sample=True, temperature=0.7, top_p=0.9, top_k=20, num_return_sequences=4, seed=1
    )
    assert sample.key() == "sample-t0.7-p0.9-k20-max128-n4-s1"
    assert sample.key() != replace(sample, seed=2).key()
    with pytest.raises(ValueError, match="do_sample: true"):
        GenerationParams(num_return_sequences=4)
    with pytest.raises(ValueError, match="temperature"):
        GenerationParams(do_sample=True, temperature=0.0)


# --------------------------------------------------------------------------- identity
def test_fingerprint_tracks_weights_and_prompt(summarizer):
    before = summarizer.fingerprint()
    assert summarizer.fingerprint() == before
    p = next(summarizer.model.parameters())
    with torch.no_grad():
        p.view(-1)[0] += 1.0
    try:
        assert summarizer.fingerprint() != before
    finally:
        with torch.no_grad():
            p.view(-1)[0] -= 1.0
    assert summarizer.fingerprint() == before
    other_prompt = SummarizerModule(
        summarizer.model,
        summarizer.tokenizer,
        replace(summarizer.prompt, max_doc_tokens=32),
        summarizer.corpus_generation,
        summarizer.rollout_generation,
    )
    assert other_prompt.fingerprint() != before
    assert instantiate(tiny_cfg(seed=1).summarizer).fingerprint() != before  # another random init


def test_save_pretrained_reloads_the_same_summarizer(summarizer, tmp_path):
    folder = summarizer.save_pretrained(tmp_path / "ckpt")
    assert (folder / "summarizer.json").is_file() and not list(tmp_path.glob(".ckpt*"))
    cfg = OmegaConf.to_container(tiny_cfg().summarizer, resolve=True)
    reloaded = build_summarizer(
        model=str(folder),
        prompt=cfg["prompt"],
        corpus_generation=cfg["corpus_generation"],
        rollout_generation=cfg["rollout_generation"],
        dtype="fp32",
    )
    assert reloaded.fingerprint() == summarizer.fingerprint()
    docs = make_docs(3)
    assert [c.text for c in reloaded.summarize(docs)] == [c.text for c in summarizer.summarize(docs)]
    assert reloaded.describe()["name"] == str(folder)
    p = next(reloaded.model.parameters())
    with torch.no_grad():
        p.view(-1)[:5] += 1.0
    assert reloaded.fingerprint() != summarizer.fingerprint()
    reloaded.load_weights(folder)  # in place: how the loop restores a finished iteration
    assert reloaded.fingerprint() == summarizer.fingerprint()


def test_shared_prefix_cache_gives_the_same_completions_for_fewer_forwarded_tokens(summarizer):
    """The few-shot prefix runs once per call; greedy and sampled completions equal the plain path."""
    few_shot = replace(
        summarizer.prompt,
        system="You write search summaries. " * 6,
        examples=(
            {
                "title": "Rail",
                "text": "The railway opened in 1904.",
                "response": "Topic: rail </think> A line.",
            },
        ),
    )
    prompts = [few_shot.render(summarizer.tokenizer, t, x) for t, x in make_docs(5)]
    plain = HFBackend(summarizer.model, summarizer.tokenizer, batch_size=4, prefix_cache=False)
    cached = HFBackend(summarizer.model, summarizer.tokenizer, batch_size=4, prefix_cache=True)
    forwarded: list[int] = []
    hook = summarizer.model.model.embed_tokens.register_forward_hook(
        lambda mod, args, out: forwarded.append(args[0].numel())
    )
    try:
        for params in (summarizer.corpus_generation, summarizer.rollout_generation):
            forwarded.clear()
            want = plain.generate(prompts, params)
            plain_tokens = sum(forwarded)
            forwarded.clear()
            got = cached.generate(prompts, params)
            assert cached.last_prefix_length >= 60 and plain.last_prefix_length == 0
            assert sum(forwarded) < plain_tokens - 2 * cached.last_prefix_length  # the prefix ran once
            assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
            assert [[c.prompt_ids for c in g] for g in got] == [[c.prompt_ids for c in g] for g in want]
    finally:
        hook.remove()
    assert HFBackend.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each row keeps one own token
    assert HFBackend.shared_prefix_length([[1, 2, 3], [4, 2, 3]]) == 0


def test_generate_kwargs_reach_generate_and_a_static_cache_gives_the_same_tokens(summarizer):
    prompts = summarizer.prompts_for(make_docs(4))
    plain = HFBackend(summarizer.model, summarizer.tokenizer, batch_size=4).generate(
        prompts, summarizer.corpus_generation
    )
    static = HFBackend(
        summarizer.model,
        summarizer.tokenizer,
        batch_size=4,
        generate_kwargs={"cache_implementation": "static"},
    )
    assert not static.prefix_cache  # a cache implementation replaces the shared-prefix cache
    seen = []
    original = summarizer.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cache_implementation"))
        return original(*args, **kwargs)

    summarizer.model.generate = spy
    try:
        out = static.generate(prompts, summarizer.corpus_generation)
    finally:
        del summarizer.model.generate
    assert seen and set(seen) == {"static"}
    assert [g[0].token_ids for g in out] == [g[0].token_ids for g in plain]
    with pytest.raises(ValueError, match="decoding settings belong"):
        HFBackend(summarizer.model, summarizer.tokenizer, generate_kwargs={"temperature": 0.5})


# --------------------------------------------------------------------------- generation dtype
def test_auto_generation_dtype_follows_the_cpu(monkeypatch):
    from resume.utils import devices

    monkeypatch.setattr(devices, "cpu_bf16_is_fast", lambda: True)
    assert devices.generation_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_bf16_is_fast", lambda: False)
    assert devices.generation_dtype("auto", "cpu") == torch.float32
    assert devices.generation_dtype("fp32", "cpu") == torch.float32
    with pytest.raises(ValueError, match="summarizer.backend.dtype='fp8'"):
        devices.generation_dtype("fp8", "cpu")
    assert devices.resolve_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)


def test_bf16_generation_of_an_fp32_model_follows_its_weights():
    """HFBackend(dtype=bf16) generates from a bf16 copy of the fp32 model, refreshed when the weights change:
    the same tokens as the model cast to bf16, before and after an optimizer step."""
    summarizer = instantiate(tiny_cfg(seed=4).summarizer)
    model, tok = summarizer.model, summarizer.tokenizer
    backend = HFBackend(model, tok, dtype="bf16")
    assert backend.describe() == {"engine": "hf", "dtype": "bfloat16"}
    prompts = summarizer.prompts_for(make_docs(4))
    params = GenerationParams(max_new_tokens=12)

    def reference():
        cast = copy.deepcopy(model).to(torch.bfloat16)
        return [g[0].token_ids for g in HFBackend(cast, tok).generate(prompts, params)]

    assert [g[0].token_ids for g in backend.generate(prompts, params)] == reference()
    assert next(model.parameters()).dtype == torch.float32  # the trained model keeps its dtype
    before = [g[0].token_ids for g in backend.generate(prompts, params)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.tensor([[1, 2, 3]])).logits.pow(2).mean().backward()
    opt.step()
    after = [g[0].token_ids for g in backend.generate(prompts, params)]
    assert after == reference() and after != before


def test_cpu_bf16_probe_is_measured_once_per_machine_and_can_be_forced(monkeypatch, tmp_path):
    """AVX512-BF16 without AMX is fast on some CPUs and slow on others: `auto` measures a matmul once,
    stores the answer in the cache (every later run and rank reads it), and RESUME_CPU_BF16 overrides."""
    from resume.utils import devices

    monkeypatch.setenv("RESUME_CACHE", str(tmp_path))
    monkeypatch.delenv("RESUME_CPU_BF16", raising=False)
    first = devices.cpu_bf16_probe(size=128, repeats=2)
    assert first["fp32_tflops"] > 0 and first["bf16_tflops"] > 0 and first["speedup"] > 0
    stored = list((tmp_path / "probes").glob("cpu_bf16-*.json"))
    assert len(stored) == 1
    stored[0].write_text(json.dumps({**first, "speedup": 9.0}))  # a later call reads, not re-measures
    assert devices.cpu_bf16_probe(size=128, repeats=2)["speedup"] == 9.0

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    for speedup, fast in ((devices.BF16_SPEEDUP_NEEDED + 0.1, True), (0.74, False)):
        monkeypatch.setattr(devices, "cpu_bf16_probe", lambda speedup=speedup: {"speedup": speedup})
        devices.cpu_bf16_is_fast.cache_clear()
        assert devices.cpu_bf16_is_fast() is fast
    monkeypatch.setenv("RESUME_CPU_BF16", "1")
    devices.cpu_bf16_is_fast.cache_clear()
    assert devices.cpu_bf16_is_fast() is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.delenv("RESUME_CPU_BF16")
    devices.cpu_bf16_is_fast.cache_clear()
    assert devices.cpu_bf16_is_fast() is False  # no bf16 instructions: emulated, never measured
    devices.cpu_bf16_is_fast.cache_clear()


def test_generation_shape_bounds_every_prompt_and_plans_the_kv_cache(summarizer):
    """The shape a backend sizes memory from: the prefix every prompt shares, a prompt-length bound that
    holds for documents past max_doc_tokens and long titles, and the larger max_new_tokens."""
    few_shot = {"title": "an example", "text": "example words " * 30, "response": "Topic: x </think> y"}
    module = copy.copy(summarizer)
    module.prompt = replace(summarizer.prompt, examples=({**few_shot},), system="Be brief. " * 20)
    shape = module.generation_shape()
    tok = module.tokenizer

    def ids(doc):
        return tok(module.prompts_for([doc])[0], add_special_tokens=False)["input_ids"]

    docs = [("short", "a b"), ("a title of twenty words " * 4, "gene cell " * 500), ("t", "protein")]
    prompts = [ids(d) for d in docs]
    common = min(next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) for a, b in pairwise(prompts))
    assert shape.prefix_tokens == common > 100  # system + few-shot turn, up to where the titles differ
    assert max(len(p) for p in prompts) <= shape.max_prompt_tokens < max(len(p) for p in prompts) + 80
    assert shape.max_new_tokens == max(
        module.corpus_generation.max_new_tokens, module.rollout_generation.max_new_tokens
    )
    # the vLLM cache: the prefix's whole blocks once, then each sequence's own blocks
    from resume.summarizer.generate import GenerationShape
    from resume.summarizer.vllm_engine import planned_kv_tokens

    assert planned_kv_tokens(GenerationShape(554, 800, 160), 16, block=128) == 512 + 16 * 4 * 128
    assert planned_kv_tokens(GenerationShape(0, 100, 28), 2, block=128) == 2 * 128
    assert planned_kv_tokens(GenerationShape(128, 129, 1), 3, block=128) == 128 + 3 * 128
    with pytest.raises(ValueError, match="inconsistent"):
        GenerationShape(10, 5, 1)
