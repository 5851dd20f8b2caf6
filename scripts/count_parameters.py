#!/usr/bin/env python
"""Prints the parameter count of every preset in configuration/presets (or of given files).

    python scripts/count_parameters.py [configuration/presets/performer-seq2seq.json ...]
"""

import argparse
import pathlib

from train import preset_config  # scripts/ is on the path of a script run from it

from modeling_performer import PerformerConfig, PerformerModel

PRESETS = pathlib.Path(__file__).resolve().parent.parent / "configuration" / "presets"


def count(path) -> int:
    """Parameters of the bare stack a preset describes (a Performer, or a transformers model of the
    preset's model_type, e.g. the Llama teacher of the linearizing recipe)."""
    config = preset_config(path)
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
    for path in args.configs or sorted(PRESETS.glob("*.json")):
        print(f"{pathlib.Path(path).stem:<28} {count(path) / 1e6:8.2f}M parameters")


if __name__ == "__main__":
    main()
