"""What several test files share, in one place (test files never import each other): kernel
inputs of one shape (`KernelCase`), the token-by-token linear and windowed kernels, their relative
error, tiny checkpoints of the Llama-family sources, tiny Performer configs, causal LMs and
inputs for every head, weights
dropped from a saved folder, a seeded training run, and loading a saved folder through remote code
in a process without the package."""

import subprocess
import sys
import textwrap

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

from modeling_performer import PerformerConfig, PerformerForCausalLM
from modeling_performer.attention import recurrent_linear_attention, recurrent_windowed_attention

from .conftest import kernel_features, numerics_env, tiny_config

MAPS = ["softmax", "relu", "hedgehog"]
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


class KernelCase:
    """Kernel inputs of one shape: batch B, H query and H_KV key/value heads of D dims, M random
    features, Hedgehog width F; `right_pad` / `left_pad` tokens of padding in rows 0 / 1. With
    `stacked`, Hedgehog maps come as one [2, H, D, F] tensor (H_KV = H), not a (query, key) pair."""

    def __init__(self, B, H, H_KV, D, M, F, right_pad=3, left_pad=5, stacked=False):
        self.B, self.H, self.H_KV, self.D, self.M, self.F = B, H, H_KV, D, M, F
        self.right_pad, self.left_pad, self.stacked = right_pad, left_pad, stacked

    def features(self, feature_map, seed=0):
        """A FAVOR+/ReLU projection [M, D], or Hedgehog (query, key) maps moved off their start."""
        w = kernel_features(feature_map, self.H, self.H_KV, self.D, self.M, self.F, seed)
        return torch.stack(w) if self.stacked and feature_map == "hedgehog" else w

    def qkv(self, length, seed=0, kv_heads=None):
        kv_heads = self.H_KV if kv_heads is None else kv_heads
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(self.B, self.H, length, self.D, generator=g),
                torch.randn(self.B, kv_heads, length, self.D, generator=g),
                torch.randn(self.B, kv_heads, length, self.D, generator=g))

    def log_weight(self, seed=3):
        """Per-head log weights of the linear part against the window."""
        return 0.5 * torch.randn(self.H, generator=torch.Generator().manual_seed(seed))

    def padding(self, length):
        """Row 0 right-padded, row 1 left-padded."""
        mask = torch.ones(self.B, length, dtype=torch.bool)
        mask[0, length - self.right_pad:] = False
        mask[1, :self.left_pad] = False
        return mask


def run_recurrent_window(q, k, v, w, feature_map, window, weight, mask=None, state=None):
    """The windowed kernel one token at a time -> (out [B, H, T, D], the last state)."""
    outs = []
    for t in range(q.shape[2]):
        step = slice(t, t + 1)
        out, state = recurrent_windowed_attention(q[:, :, step], k[:, :, step], v[:, :, step], w, feature_map, window,
                                                  weight, None if mask is None else mask[:, step], state)
        outs.append(out)
    return torch.cat(outs, dim=2), state


def sparse_tiny_config(**overrides):
    """A tiny decoder config with a window of 3 and a sparse cache of 2."""
    values = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=37, num_random_features=16, hedgehog_dim=8, chunk_size=4, hidden_dropout_prob=0.0,
                  local_window=3, sparse_cache_size=2)
    values.update(overrides)
    return PerformerConfig(**values)


def sink_tiny_config(**overrides):
    """A tiny Hedgehog config with a window of 3 and one sink token."""
    values = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=37, hedgehog_dim=8, hidden_dropout_prob=0.0, feature_map="hedgehog",
                  local_window=3, sink_tokens=1, pad_token_id=0)
    values.update(overrides)
    return PerformerConfig(**values)


FAMILIES = {
    # name: (config class, model class, settings)
    "llama-gqa-llama3-untied": ("LlamaConfig", "LlamaForCausalLM",
                                dict(num_key_value_heads=2, rope_parameters=LLAMA3, tie_word_embeddings=False,
                                     attention_bias=True, mlp_bias=True)),
    "llama-mqa-linear-tied": ("LlamaConfig", "LlamaForCausalLM",
                              dict(num_key_value_heads=1, tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "mistral-gqa": ("MistralConfig", "MistralForCausalLM",
                    dict(num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)),
    "qwen2-biases-yarn": ("Qwen2Config", "Qwen2ForCausalLM",
                          dict(num_key_value_heads=2, tie_word_embeddings=True,
                               rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1000000.0,
                                                "original_max_position_embeddings": 16})),
    "qwen3-qk-norm-head-dim": ("Qwen3Config", "Qwen3ForCausalLM",
                               dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                                    max_position_embeddings=8)),  # the prompts go beyond: NTK scaling applies
}


def tiny_source(family, folder, tokenizer, **changes):
    """A random checkpoint of the family, every weight (norms and biases included) moved off its
    initial value, saved with the bundled tokenizer."""
    config_class, model_class, settings = FAMILIES[family]
    values = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    values.update(settings)
    values.update(changes)
    config = getattr(transformers, config_class)(**values)
    torch.manual_seed(0)
    source = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, parameter in source.named_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter) + (0.1 if name.endswith("norm.weight") else 0.0))
    source.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return source


REMOTE_LOAD = textwrap.dedent(
    """
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_performer" or name.startswith("modeling_performer."):
                raise ModuleNotFoundError("blocked " + name)
    sys.meta_path.insert(0, Block())
    try:
        import modeling_performer
        raise SystemExit("the package must not be importable here")
    except ModuleNotFoundError:
        pass
    import torch, transformers
    folder, reference, auto_name = sys.argv[1:4]
    model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    ref = torch.load(reference)
    out = model(ref["ids"])
    torch.testing.assert_close(out.logits, ref["logits"], rtol=0, atol=0)
    if hasattr(model, "generate"):
        generated = model.generate(ref["ids"], max_new_tokens=5, do_sample=False)
        assert torch.equal(generated, ref["generated"]), (generated, ref["generated"])
    print("remote ok")
    """
)


def run_remote(folder, reference, auto_name, tmp_path):
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_LOAD)
    done = subprocess.run([sys.executable, str(script), str(folder), str(reference), auto_name],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **numerics_env()})
    assert "remote ok" in done.stdout, done.stdout + done.stderr


ATTENTION = {"favor": "favor", "softmax": "softmax", "hybrid": ["favor", "softmax"]}


def causal_lm(attention, **overrides):
    """The tiny causal LM with `attention` ("favor", "softmax" or "hybrid": one layer of each)."""
    return PerformerForCausalLM(tiny_config(attention_type=ATTENTION[attention], **overrides)).eval()


def relative_error(actual, expected, mask=None):
    """max |actual - expected| / max |expected|, over the real tokens of `mask` [B, T] if given."""
    diff = (actual.double() - expected.double()).abs()
    if mask is not None:
        diff = diff * mask[:, None, :, None]
    return (diff.max() / expected.double().abs().max().clamp_min(1e-30)).item()


def run_recurrent_linear(q, k, v, w, feature_map, mask=None, state=None):
    """The linear kernel one token at a time -> (out [B, H, T, D], the last state)."""
    outs = []
    for t in range(q.shape[2]):
        step_mask = None if mask is None else mask[:, t : t + 1]
        out, state = recurrent_linear_attention(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], w, feature_map, step_mask, state
        )
        outs.append(out)
    return torch.cat(outs, dim=2), state


def drop_weights(folder, *suffixes):
    """Removes the tensors whose names end with `suffixes` from a saved folder -> their names."""
    weights = load_file(folder / "model.safetensors")
    dropped = [k for k in weights if k.endswith(suffixes)]
    for key in dropped:
        del weights[key]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return dropped


def seeded_training_losses(steps=8):
    """A short training run with dropout and a projection redraw every 2 steps."""
    torch.manual_seed(1234)
    model = PerformerForCausalLM(tiny_config(hidden_dropout_prob=0.1, feature_redraw_interval=2)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.redraw_on_steps(optimizer)
    data = torch.randint(3, 99, (steps, 4, 16), generator=torch.Generator().manual_seed(7))
    losses = []
    for batch in data:
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert int(model.model.redraw_state.draws) == steps // 2
    return losses


def decay_config(decay, **overrides):
    """The tiny decoder with Hedgehog maps and a decaying state (`decay`: "head" or "data")."""
    values = dict(is_decoder=True, num_key_value_heads=2, feature_map="hedgehog", linear_decay=decay)
    values.update(overrides)
    return tiny_config(**values)


AUTO = {
    "base": AutoModel,
    "mlm": AutoModelForMaskedLM,
    "classification": AutoModelForSequenceClassification,
    "clm": AutoModelForCausalLM,
    "seq2seq": AutoModelForSeq2SeqLM,
}


def inputs_for(head, batch=2, length=7, seed=0):
    """Two rows of random ids (the second right-padded by two) and the labels `head` takes."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -2:] = 0  # right padding in the second row
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if head in ("mlm", "clm", "seq2seq"):
        kwargs["labels"] = ids.masked_fill(mask == 0, -100)
    if head == "classification":
        kwargs["labels"] = torch.tensor([0, 1])
    return kwargs


def left_padded_batch(length, seed=0):
    """Two rows of random ids, the second left-padded by 4 tokens -> (ids, mask)."""
    ids = torch.randint(3, 99, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :4] = 0
    return ids, mask


def decode_in_steps(model, ids, mask, prefill=5):
    """The full forward's logits, and the same positions from a prefill of `prefill` tokens then one
    token at a time through the cache -> (full, stepped, the last cache)."""
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(prefill, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    return full, torch.cat(steps, 1), cache


def assert_cached_generation_equals_uncached(model, ids, mask, max_new_tokens):
    """Greedy and beam search give the same tokens with and without the cache."""
    for kwargs in ({"do_sample": False}, {"num_beams": 3, "do_sample": False}):
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, **kwargs)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached), kwargs


def decode_greedily(model, ids, steps):
    """A prefill of `ids`, then `steps` greedy tokens through the cache -> (the last output, the
    cache, its bytes after the prefill)."""
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.cache
        size = cache.num_bytes()
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
    return out, cache, size
