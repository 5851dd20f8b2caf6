"""Fitting throughput of attention transfer with the teacher run in every step, against the
teacher computed once and read back (transfer.TeacherCache), the variants timed in turn in this
process (modeling_performer.recipes.transfer_timing).

    python scripts/bench_transfer.py outputs/frontier/shared/teacher outputs/frontier/top3/chat/converted \
        --data outputs/frontier/shared/rows.jsonl --output docs/figures/smollm2/transfer_throughput.json
"""

import argparse
import json
import os
import pathlib

from modeling_performer.recipes.chat_lm import write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="softmax Performer folder")
    parser.add_argument("student", help="its linear (or hybrid) conversion")
    parser.add_argument("--data", required=True, help=".jsonl rows with a 'text' field (one sequence each)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="steps per stage and fit (the first is a warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kl-positions", type=int, default=512)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--recipe-steps", type=int, nargs=2, default=[120, 100], metavar=("LAYER", "KL"),
                        help="steps of each stage the minutes are projected for (the chat-lm recipe's: %(default)s)")
    parser.add_argument("--output", help="JSON file for the result (default: print only)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from modeling_performer import PerformerForCausalLM
    from modeling_performer.recipes import transfer_timing
    from modeling_performer.recipes.texts import read_texts

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    texts = read_texts(pathlib.Path(args.data))
    batches = transfer_timing.row_batches(tokenizer, texts, args.seq_len, args.steps * 2)
    result = transfer_timing.measure(
        lambda: PerformerForCausalLM.from_pretrained(args.teacher), lambda: PerformerForCausalLM.from_pretrained(
            args.student), batches, args.steps, args.steps, args.rounds, args.top_k,
        {"kl_positions": args.kl_positions, "lora_rank": args.lora_rank, "learning_rate": 3e-2,
         "end_to_end_learning_rate": 3e-3})
    result["recipe_minutes"] = transfer_timing.projected_minutes(result, *args.recipe_steps)
    result.update({"recipe_steps": args.recipe_steps, "teacher": args.teacher, "student": args.student,
                   "seq_len": args.seq_len, "top_k": args.top_k, "kl_positions": args.kl_positions,
                   "lora_rank": args.lora_rank, "threads": torch.get_num_threads(), "cpus": os.cpu_count()})
    print(json.dumps(result, indent=2))
    if args.output:
        write_json(args.output, result)


if __name__ == "__main__":
    main()
