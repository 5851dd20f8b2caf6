"""Several training processes (gloo) on one CPU machine: accelerate launch (DDP) and train.py
--fsdp under torchrun (FSDP2). Identical projections on every rank after seeded redraws, the loss
curve and weights of one process given the same global batch, sharded memory, checkpoints that
reload and resume."""

import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from .conftest import prepare_data

ROOT = pathlib.Path(__file__).resolve().parent.parent


def prepared_text(tmp_path):
    """A 60-row slice of the bundled plays, prepared by the real script."""
    prepare_data(tmp_path / "data", "text")
    return tmp_path / "data"


@pytest.mark.slow
def test_two_process_training_with_accelerate(tmp_path):
    launcher = shutil.which("accelerate", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("accelerate")
    assert launcher, "accelerate's launcher is installed with the package"
    data = prepared_text(tmp_path)
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


def torchrun(processes, config, data, output, *extra):
    launcher = shutil.which("torchrun", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("torchrun")
    assert launcher, "torchrun comes with torch"
    return [launcher, "--nproc-per-node", str(processes), "--master-port", str(29500 + processes + 7 * os.getpid() % 500),
            str(ROOT / "scripts" / "train.py"), "--task", "clm", "--fsdp", "--device", "cpu", "--config", str(config),
            "--data", str(data), "--output", str(output), "--max-steps", "40", "--eval-steps", "8",
            "--global-batch-size", "8", "--seq-len", "32", "--learning-rate", "3e-3", "--quiet", *extra]


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_matches_one_shards_memory_and_resumes(tmp_path):
    """train.py --fsdp under torchrun (gloo): per-step losses of 2 processes equal those of one
    with the same global batch; each rank holds about half the parameters and optimizer state;
    the gathered folder loads and decodes what the sharded model decoded; a run killed after a
    sharded checkpoint resumes to the uninterrupted result."""
    data = prepared_text(tmp_path)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({
        "model_type": "performer", "is_decoder": True, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "num_random_features": 16, "hidden_dropout_prob": 0.0,
        "max_position_embeddings": 64, "feature_redraw_interval": 4}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def run(processes, output, *extra):
        done = subprocess.run(torchrun(processes, config, data / "text", output, *extra), capture_output=True,
                              text=True, timeout=600, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return json.loads((output / "metrics.json").read_text()), done.stdout

    two, printed = run(2, tmp_path / "two")
    one, _ = run(1, tmp_path / "one")
    assert two["world_size"] == 2 and one["world_size"] == 1 and len(two["train_loss_history"]) == 40
    for (step_a, loss_a, norm_a), (step_b, loss_b, norm_b) in zip(two["train_loss_history"], one["train_loss_history"]):
        assert step_a == step_b and loss_a == pytest.approx(loss_b, rel=1e-4), step_a
        assert norm_a == pytest.approx(norm_b, rel=1e-4)
    assert two["train_loss_history"][-1][1] < two["train_loss_history"][0][1] - 1.0  # it learns
    assert two["projections_identical_across_ranks"] is True and two["projection_draws"] == 10
    assert two["max_rank_over_one_process"] <= 0.6, two["memory_per_rank"]
    assert "on the largest rank against" in printed
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import modeling_performer  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two").eval()
    prompt = torch.tensor(two["greedy_tokens_at_end"])[:, :-8]
    tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert tokens.tolist() == two["greedy_tokens_at_end"]
    assert int(model.model.redraw_state.draws) == 10
    assert not any(p.name.startswith("checkpoint-") for p in (tmp_path / "two").iterdir())

    # Killed once a sharded checkpoint exists, then the same command with --resume
    killed = tmp_path / "killed"
    process = subprocess.Popen(torchrun(2, config, data / "text", killed, "--resume"), env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = pathlib.Path(f"{killed}.checkpoints") / "checkpoint-8" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kill_processes_naming(killed)  # torchrun starts each worker in a session of its own
    assert marker.exists() and not (killed / "config.json").exists(), "the kill came too late to interrupt the run"
    resumed, printed = run(2, killed, "--resume")
    assert "resuming from" in printed
    assert [h[1] for h in resumed["train_loss_history"]] == pytest.approx([h[1] for h in two["train_loss_history"]],
                                                                         rel=1e-6)
    weights, again = load_file(tmp_path / "two" / "model.safetensors"), load_file(killed / "model.safetensors")
    for name in weights:
        torch.testing.assert_close(again[name], weights[name], rtol=1e-6, atol=1e-7, msg=name)


def kill_processes_naming(path):
    """SIGKILLs every process whose command line names `path` (the workers of a killed launcher),
    and waits until they are gone."""
    needle = str(path).encode()
    deadline = time.time() + 30
    while time.time() < deadline:
        found = []
        for entry in pathlib.Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if needle in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:  # gone meanwhile, or not ours to read
                    continue
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"processes naming {path} survived SIGKILL")


def test_fsdp_refuses_a_global_batch_the_processes_do_not_divide(tmp_path, monkeypatch):
    from modeling_performer.recipes.commands import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    output = tmp_path / "never"
    with pytest.raises(SystemExit, match="--global-batch-size 7 is not divisible by 2 processes x 1"):
        train.main(["--task", "clm", "--fsdp", "--global-batch-size", "7", "--output", str(output), "--device", "cpu"])
    assert not output.exists() and not pathlib.Path(f"{output}.checkpoints").exists()
    monkeypatch.delenv("RANK")
    with pytest.raises(SystemExit, match="under torchrun"):
        train.main(["--task", "clm", "--fsdp", "--output", str(output)])


def test_accelerate_configs_parse_and_name_our_layer():
    from accelerate.commands.config.config_args import load_config_from_file

    from modeling_performer import PerformerPreTrainedModel

    folder = ROOT / "configuration" / "accelerate"
    fsdp = load_config_from_file(str(folder / "fsdp.yaml"))
    assert str(fsdp.distributed_type).endswith("FSDP") and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] in PerformerPreTrainedModel._no_split_modules
    for name in ("fsdp.yaml", "gpu-single-node.yaml"):  # no process count of some other machine
        assert load_config_from_file(str(folder / name)).num_processes == -1
    assert load_config_from_file(str(folder / "cpu-2-processes.yaml")).num_processes == 2
