"""Lays out transformers' own common model tests (ModelTesterMixin, ConfigTester) for the
installed transformers version, so that our heads meet the standard of an in-tree model.

The test files are not in the transformers wheel; the source distribution of the same version
ships `tests/test_*.py` (fetched once with `pip download --no-binary :all:` into `.cache/`).
It leaves out a few helper modules that those files import (`tests/generation`,
`tests/exporters`, `tests/utils`); `_STAND_INS` provides minimal modules of our own under their
names, and the tests that would need the real ones are skipped with the reason.
"""

import importlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import transformers

PACKAGE = "hf_common_tests"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / f"transformers-{transformers.__version__}-tests"

# Written by us; the names are the ones the sdist's test files import.
_STAND_INS = {
    "exporters/__init__.py": "",
    # Export is tested by tests/test_export.py (torch.export and ONNX through onnxruntime).
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/__init__.py": "",
    # Not shipped in the sdist: generation is tested by tests/test_generation.py.
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/__init__.py": "",
    # Every common PreTrainedConfig argument with a value other than its default.
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        "    'return_dict': False,\n"
        "    'output_hidden_states': True,\n"
        "    'dtype': 'float16',\n"
        "    'chunk_size_feed_forward': 5,\n"
        "    'architectures': ['PerformerModel'],\n"
        "    'finetuning_task': 'translation',\n"
        "    'id2label': {0: 'label'},\n"
        "    'label2id': {'label': '0'},\n"
        "    'tokenizer_class': 'BertTokenizerFast',\n"
        "    'prefix': 'prefix',\n"
        "    'bos_token_id': 6,\n"
        "    'pad_token_id': 7,\n"
        "    'eos_token_id': 8,\n"
        "    'sep_token_id': 9,\n"
        "    'decoder_start_token_id': 10,\n"
        "    'task_specific_params': {'translation': 'some_params'},\n"
        "    'problem_type': 'regression',\n"
        "}\n"
    ),
}


class SuiteUnavailable(RuntimeError):
    pass


def _download(target: Path) -> Path:
    version = transformers.__version__
    target.mkdir(parents=True, exist_ok=True)
    archive = target / f"transformers-{version}.tar.gz"
    if not archive.exists():
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
             f"transformers=={version}", "-d", str(target)],
            capture_output=True, text=True,
        )
        if result.returncode or not archive.exists():
            raise SuiteUnavailable(
                f"could not fetch the transformers {version} source distribution (its tests are not in the wheel): "
                f"{result.stderr.strip()[-300:]}"
            )
    return archive


def _layout() -> Path:
    """Returns the folder that holds the `hf_common_tests` package (built once, atomically)."""
    package = CACHE / PACKAGE
    if (package / "__init__.py").exists():
        return CACHE
    archive = _download(CACHE)
    staging = CACHE / f".{PACKAGE}-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    prefix = f"transformers-{transformers.__version__}/tests/"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith(prefix) and member.isfile() and "/" not in name[len(prefix):] and name.endswith(".py"):
                (staging / name[len(prefix):]).write_bytes(tar.extractfile(member).read())
    for relative, text in _STAND_INS.items():
        path = staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (staging / "__init__.py").write_text("")
    os.replace(staging, package)
    return CACHE


def load(module: str):
    """Imports `hf_common_tests.<module>` (e.g. "test_modeling_common")."""
    root = str(_layout())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"{PACKAGE}.{module}")
