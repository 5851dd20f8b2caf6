"""The command-line tools of scripts/, one module each: argparse and the steps of the job, calling
into the rest of modeling_performer.recipes. scripts/X.py runs commands/X.py's main()."""
