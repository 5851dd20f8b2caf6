"""The package as a user installs it: a wheel carries the presets, the bundled tokenizer, the
accelerate configs and the card template, which load by name with no path into the repository."""

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

USE_INSTALLED = r'''
import pathlib, sys
import modeling_performer
from modeling_performer.bundled import card_template, load_preset, preset_names, preset_path, tokenizer_path
from transformers import AutoTokenizer

site = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(modeling_performer.__file__).resolve().is_relative_to(site), modeling_performer.__file__
assert "performer-small-encoder" in preset_names() and "llama-small-decoder" in preset_names()
config = load_preset("performer-small-encoder")
assert config.model_type == "performer" and load_preset("llama-small-decoder").model_type == "llama"
tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
assert len(tokenizer) == 8000 and tokenizer.mask_token == "<mask>"
for path in (preset_path("performer-seq2seq"), tokenizer_path(), card_template()):
    assert path.resolve().is_relative_to(site), path
try:
    preset_path("no-such-preset")
except FileNotFoundError as error:
    assert "performer-small-encoder" in str(error)
print("ok", len(tokenizer))
'''


@pytest.mark.slow
def test_an_installed_wheel_loads_presets_tokenizer_and_card_by_name(tmp_path):
    import setuptools

    # The environment's setuptools builds it when new enough for the SPDX licence (>= 77, which torch
    # 2.13 requires anyway); otherwise pip builds in isolation with the pyproject's build requirements.
    build = ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 77 else []
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", *build, "-q", "-w",
                            str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("modeling_performer-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "modeling_performer/configuration/tokenizer/tokenizer.json" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    (tmp_path / "elsewhere").mkdir()  # not the repository: nothing can be found by a relative path
    done = subprocess.run([sys.executable, "-c", USE_INSTALLED, str(site)], capture_output=True, text=True,
                          cwd=tmp_path / "elsewhere", env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1",
                                                           "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0 and "ok 8000" in done.stdout, done.stderr[-3000:]


def test_checkout_finds_the_same_files():
    from modeling_performer.bundled import accelerate_config, card_template, preset_path, tokenizer_path

    assert preset_path("performer-small-encoder") == ROOT / "configuration" / "presets" / "performer-small-encoder.json"
    assert tokenizer_path() == ROOT / "configuration" / "tokenizer"
    assert card_template() == ROOT / "model_cards" / "performer.md"
    assert accelerate_config("fsdp").is_file()
