"""The options of scripts/train.py (`parse_args`), the model config they give (`load_config`) and
what is wrong with them before anything is written (`check_request`)."""

import argparse

from .devices import add_device_arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=["clm", "mlm", "classification", "seq2seq"])
    parser.add_argument("--config", default="performer-small-encoder",
                        help="a preset name from configuration/presets or a config JSON path; a config of another "
                             "model_type (llama-small-decoder: a LlamaForCausalLM) trains that transformers model "
                             "(--task clm), a softmax teacher to convert and linearize")
    parser.add_argument("--init", help="start from this saved model folder instead of random weights")
    parser.add_argument("--attention-type", choices=["favor", "softmax"], help="override the config's attention type")
    parser.add_argument("--feature-map", choices=["softmax", "relu", "hedgehog"],
                        help="override the config's linear-attention features (hedgehog: learned maps)")
    parser.add_argument("--local-window", type=int, help="override the config's exact local window (0 = off)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the --init model's, else the bundled "
                                             "8,000-piece tokenizer in configuration/tokenizer)")
    parser.add_argument("--train-tokenizer", type=int, default=0, metavar="VOCAB",
                        help="train a SentencePiece tokenizer of this many pieces on the training split first "
                             "(saved with the model; 0 = use --tokenizer)")
    data = parser.add_argument_group("data (see modeling_performer/recipes/data_sources.py)")
    data.add_argument("--data", help="a folder with train/validation/test files (.jsonl, .json, .csv, .parquet, .txt), "
                                     "one such file (split 80/10/10 with a fixed seed), or a Hub dataset name "
                                     "(default: the bundled data_cache/<dataset> of the task)")
    data.add_argument("--text-column", default="text", help="clm, mlm, classification: the text (%(default)s)")
    data.add_argument("--label-column", default="label",
                      help="classification: the label, strings or integers (floats: regression) (%(default)s)")
    data.add_argument("--source-column", help="seq2seq: the source text (default: source, or en beside es)")
    data.add_argument("--target-column", help="seq2seq: the target text (default: target, or es beside en)")
    data.add_argument("--num-labels", type=int, help="classification: number of classes (default: from the data)")
    data.add_argument("--label-names", help="classification: comma-separated class names, in id order")
    parser.add_argument("--output", required=True,
                        help="the model folder (what goes to the Hub); checkpoints go to OUTPUT.checkpoints beside it")
    parser.add_argument("--checkpoint-dir", help="where Trainer checkpoints go (default: OUTPUT.checkpoints)")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per device and micro-batch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-steps", type=int, default=100)
    parser.add_argument("--max-train-rows", type=int, default=0, help="use at most this many training rows (0 = all)")
    parser.add_argument("--max-eval-rows", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bleu-rows", type=int, default=300, help="seq2seq: test pairs translated for BLEU/chrF")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="fine-tune --init through LoRA adapters of this rank (0 = all weights train)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank)")
    parser.add_argument("--resume", action="store_true", help="resume from the newest complete checkpoint")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard parameters, gradients and optimizer state with FSDP2 (launch with torchrun; "
                             "see modeling_performer/recipes/fsdp_training.py)")
    parser.add_argument("--global-batch-size", type=int,
                        help="--fsdp: sequences per optimizer step over all processes (sets the per-device batch)")
    add_device_arguments(parser, training=True)
    hub = parser.add_argument_group("model card and Hub")
    hub.add_argument("--hub-model-id", help="the Hub repository (user/name) the card and --push-to-hub name")
    hub.add_argument("--push-to-hub", action="store_true", help="upload the finished model folder to --hub-model-id")
    hub.add_argument("--license", help="the card's licence (default: the --init model's, apache-2.0 on the "
                                       "bundled data, else unknown)")
    hub.add_argument("--base-model", help="the Hub id of the model this one was fine-tuned or converted from "
                                          "(default: what --init records)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def load_config(args, tokenizer):
    from modeling_performer import PerformerConfig

    from modeling_performer.bundled import load_preset, preset_path

    try:
        path = preset_path(args.config)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    config = load_preset(path)
    if not isinstance(config, PerformerConfig):
        performer_options = [f"--{o.replace('_', '-')}" for o in ("attention_type", "feature_map", "local_window")
                             if getattr(args, o) is not None]
        if args.task != "clm" or performer_options:
            raise SystemExit(f"{path.name} is a {config.model_type!r} config: it trains as a transformers causal LM "
                             f"(--task clm) without Performer options ({', '.join(performer_options) or args.task})")
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    config.decoder_start_token_id = tokenizer.bos_token_id
    config.max_position_embeddings = max(config.max_position_embeddings, args.seq_len)
    if args.attention_type:
        config.attention_type = args.attention_type
    if args.feature_map:
        config.feature_map = args.feature_map
    if args.local_window is not None:
        config.local_window = args.local_window
    if isinstance(config, PerformerConfig):
        config._normalise_and_validate()
    return config


def check_request(args):
    """What is wrong with the options themselves, found before anything is written."""
    if args.push_to_hub and not args.hub_model_id:
        raise SystemExit("--push-to-hub needs --hub-model-id (user/name)")
    if args.gradient_accumulation_steps < 1 or args.batch_size < 1:
        raise SystemExit("--batch-size and --gradient-accumulation-steps must be at least 1")
    if args.train_tokenizer and (args.init or args.tokenizer):
        raise SystemExit("--train-tokenizer makes a new vocabulary: it goes with neither --init nor --tokenizer")
    if args.lora_rank and not args.init:
        raise SystemExit("--lora-rank fine-tunes a trained model: give it with --init")
