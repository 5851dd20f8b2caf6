#!/usr/bin/env python
"""Prints the parameter count of every preset in configuration/presets (or of given files).

    python scripts/count_parameters.py [configuration/presets/performer-seq2seq.json ...]
"""

import argparse
import json
import pathlib

from modeling_performer import PerformerConfig, PerformerModel

PRESETS = pathlib.Path(__file__).resolve().parent.parent / "configuration" / "presets"


def count(path) -> int:
    """Parameters of the bare stack a preset describes (a Performer, or a transformers model of the
    preset's model_type, e.g. the Llama teacher of the linearizing recipe)."""
    values = json.loads(pathlib.Path(path).read_text())
    model_type = values.pop("model_type", PerformerConfig.model_type)
    if model_type == PerformerConfig.model_type:
        model = PerformerModel(PerformerConfig.from_dict(values))
    else:
        from transformers import AutoConfig, AutoModel

        model = AutoModel.from_config(AutoConfig.for_model(model_type, **values))
    return sum(p.numel() for p in model.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help="config JSON files (default: every preset)")
    args = parser.parse_args()
    for path in args.configs or sorted(PRESETS.glob("*.json")):
        print(f"{pathlib.Path(path).stem:<28} {count(path) / 1e6:8.2f}M parameters")


if __name__ == "__main__":
    main()
