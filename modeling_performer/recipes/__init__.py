"""What the command-line tools in scripts/ are made of: training (Trainer and FSDP2), data sources,
devices, tokenizers, model cards and benchmark plumbing. The models never import it, so a saved
model's remote-code folder stays the modeling files alone.

Each `scripts/<tool>.py` is a thin entry point over one module here; `python scripts/<tool>.py
--help` is its reference. Paths default to the checkout (`ROOT`): data in data_cache/, results
in outputs/ and docs/figures/.
"""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
