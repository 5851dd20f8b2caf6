"""push_to_hub offline: a stand-in Hub client writes every committed file to a local folder, which
then loads with trust_remote_code in a fresh process that cannot import the package."""

import io
import pathlib
import types

import pytest
import torch
from transformers import AutoTokenizer
from transformers.utils import hub as transformers_hub

from modeling_performer import PerformerForCausalLM

from .conftest import tiny_config
from .helpers import run_remote

TOKENIZER = pathlib.Path(__file__).resolve().parent.parent / "configuration" / "tokenizer"


class LocalHub:
    """Implements the two HfApi calls push_to_hub makes, against a folder."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.commits = []

    def create_repo(self, repo_id, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=True)
        return types.SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        names = []
        for op in operations:
            target = self.root / repo_id / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = op.path_or_fileobj
            if isinstance(source, (str, pathlib.Path)):
                target.write_bytes(pathlib.Path(source).read_bytes())
            elif isinstance(source, bytes):
                target.write_bytes(source)
            else:
                target.write_bytes(source.read() if isinstance(source, io.IOBase) else bytes(source))
            names.append(op.path_in_repo)
        self.commits.append((commit_message, names))
        return types.SimpleNamespace(commit_url=f"local://{repo_id}", oid="0" * 40)


@pytest.mark.parametrize("extra", [{}, {"feature_map": "hedgehog", "local_window": 3}], ids=["favor", "hedgehog-window"])
def test_push_to_hub_round_trip(tmp_path, monkeypatch, extra):
    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(transformers_hub, "_hf_api", hub)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)
    model = PerformerForCausalLM(config).eval()
    model.push_to_hub("someone/performer-tiny")
    tokenizer.push_to_hub("someone/performer-tiny")
    folder = tmp_path / "hub" / "someone" / "performer-tiny"
    uploaded = {p.name for p in folder.iterdir()}
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "modeling_performer.py", "configuration_performer.py", "attention.py", "feature_maps.py",
                 "cache_performer.py"):
        assert name in uploaded, (name, uploaded)
    assert hub.commits
    ids = tokenizer(["To be, or not to be"], return_tensors="pt")["input_ids"]
    reference = tmp_path / "reference.pt"
    torch.save({"ids": ids, "logits": model(ids).logits,
                "generated": model.generate(ids, max_new_tokens=5, do_sample=False)}, reference)
    run_remote(folder, reference, "AutoModelForCausalLM", tmp_path)
