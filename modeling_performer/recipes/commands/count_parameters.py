"""Prints the parameter count of every preset in configuration/presets (or of given files).

    python scripts/count_parameters.py [configuration/presets/performer-seq2seq.json ...]
"""

import argparse
import pathlib

from modeling_performer import PerformerConfig, PerformerModel
from modeling_performer.bundled import load_preset, preset_names, preset_path


def count(path) -> int:
    """Parameters of the bare stack a preset describes (a Performer, or a transformers model of the
    preset's model_type, e.g. the Llama teacher of the linearizing recipe)."""
    config = load_preset(path)
    if isinstance(config, PerformerConfig):
        model = PerformerModel(config)
    else:
        from transformers import AutoModel

        model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help="config JSON files (default: every preset)")
    args = parser.parse_args()
    for path in args.configs or [preset_path(name) for name in preset_names()]:
        print(f"{pathlib.Path(path).stem:<28} {count(path) / 1e6:8.2f}M parameters")


if __name__ == "__main__":
    main()
