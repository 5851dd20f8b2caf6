"""Two training processes (gloo) through accelerate launch: identical projections on both ranks
after seeded redraws, finite losses, a checkpoint that reloads, and the same loss curve and
weights as one process given the same global batch."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_process_training_with_accelerate(tmp_path):
    launcher = shutil.which("accelerate", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("accelerate")
    assert launcher, "accelerate's launcher is installed with the package"
    data = tmp_path / "data"
    data.mkdir()
    cache = ROOT / "data_cache" / "downloads"
    if cache.exists():
        (data / "downloads").symlink_to(cache, target_is_directory=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--output", str(data), "--datasets",
                    "text", "--max-rows", "60"], check=True, capture_output=True, timeout=600)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "model_type": "performer", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "num_random_features": 16, "hidden_dropout_prob": 0.0,
        "max_position_embeddings": 64, "feature_redraw_interval": 2,
    }))
    output = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def train(prefix, output, batch_size):
        done = subprocess.run(
            [*prefix, str(ROOT / "scripts" / "train.py"), "--task", "clm", "--config", str(config), "--data",
             str(data / "text"), "--output", str(output), "--max-steps", "6", "--eval-steps", "3", "--batch-size",
             str(batch_size), "--seq-len", "32", "--quiet"], capture_output=True, text=True, timeout=600, env=env,
            cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]

    train([launcher, "launch", "--config_file", str(ROOT / "configuration" / "accelerate" / "cpu-2-processes.yaml")],
          output, batch_size=4)
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["projections_identical_across_ranks"] is True
    assert metrics["projection_draws"] >= 1  # redraws happened during training
    assert math.isfinite(metrics["validation_loss"])
    from transformers import AutoModelForCausalLM

    import modeling_performer  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(output)
    assert int(model.model.redraw_state.draws) == metrics["projection_draws"]
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()

    # One process with the same global batch (2 x 4): the same per-step losses, gradient norms and final
    # weights up to reduction order, so loss and gradients are normalised by the global token count.
    single = tmp_path / "single"
    train([sys.executable], single, batch_size=8)
    one = json.loads((single / "metrics.json").read_text())
    assert len(one["train_loss_history"]) == len(metrics["train_loss_history"]) == 6
    for (step_a, loss_a, norm_a), (step_b, loss_b, norm_b) in zip(one["train_loss_history"],
                                                                  metrics["train_loss_history"]):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-5)
        assert norm_a == pytest.approx(norm_b, rel=1e-4)
    assert one["validation_loss"] == pytest.approx(metrics["validation_loss"], rel=1e-5)
    from safetensors.torch import load_file

    weights_one, weights_two = load_file(single / "model.safetensors"), load_file(output / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_one[name], weights_two[name], rtol=1e-5, atol=1e-5, msg=name)
