"""scripts/train.py: the request checked before anything is written, then training with Trainer
(`training.run`) or, with --fsdp, with FSDP2 under torchrun (`fsdp_training.main`). The options
are `training_options.parse_args`'s."""

import json
import pathlib

from .. import fsdp_training, training, training_options


def main(argv=None) -> dict:
    args = training_options.parse_args(argv)
    output = pathlib.Path(args.output)
    checkpoints = pathlib.Path(args.checkpoint_dir or f"{output}.checkpoints")
    if args.resume and (output / "config.json").exists() and (output / "metrics.json").exists():
        print(f"{args.output} is complete (config.json and metrics.json): nothing to resume; remove them to train again")
        return json.loads((output / "metrics.json").read_text())
    training_options.check_request(args)
    if args.fsdp:
        return fsdp_training.main(args)
    return training.run(args, output, checkpoints)


if __name__ == "__main__":
    main()
