"""``python -m llama.eval perplexity ...`` and ``python -m llama.eval lm-eval ...``.

``perplexity`` is ``llama.eval.perplexity.main`` (every flag checked before anything loads). ``lm-eval`` registers
this library's lm-eval model (``--model llama``) and hands every other argument to lm-eval's own command line.
"""

import sys

USAGE = """usage: python -m llama.eval COMMAND ...

commands:
  perplexity  perplexity (and KL divergence) of a checkpoint on a text, as llama.cpp's llama-perplexity computes it
              (python -m llama.eval perplexity --help)
  lm-eval     lm-evaluation-harness with this library's model registered as `llama`; the arguments are lm-eval's:
              python -m llama.eval lm-eval --model llama --model_args ckpt_dir=DIR[,tokenizer_path=P,...] --tasks T
"""

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0)
    if args[0] in ("lm-eval", "lm_eval"):
        from llama.eval.harness import cli

        sys.exit(cli(args[1:]))
    from llama.commandline import fire_checked
    from llama.eval import perplexity

    fire_checked({"perplexity": perplexity.main}, args=args, name="python -m llama.eval")
