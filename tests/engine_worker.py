"""Run under torchrun by test_engine_ranks.py: the continuous-batching engine with model-parallel ranks. Rank 0
schedules staggered requests (one cancelled) while the other ranks follow its plans; it prints, as JSON, each
request's engine result and the same request run alone through generate (on every rank, in step)."""

import json
import sys
import time

import torch

from llama import Llama
from llama.engine.batching import Engine
from llama.engine.requests import SamplingParams


def main(ckpt_dir: str, tokenizer_path: str, prompts: str) -> None:
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=2, device="cpu",
                            dtype=torch.float32)  # fmt: skip
    texts = json.loads(prompts)
    encoded = [generator.tokenizer.encode(t, bos=True, eos=False) for t in texts]
    lengths = [10 + 3 * i for i in range(len(texts))]
    alone = [generator.generate([p], n, temperature=0, logprobs=True) for p, n in zip(encoded, lengths)]
    engine = Engine.for_llama(generator, prefill_chunk=3)
    if torch.distributed.get_rank() != 0:
        engine.follow()  # until rank 0 closes its engine
        return
    handles = []
    for prompt, n in zip(encoded, lengths):  # staggered: more requests than slots, arriving while others run
        handles.append(engine.submit(prompt, SamplingParams(temperature=0, max_gen_len=n, logprobs=True)))
        time.sleep(0.05)
    doomed = engine.submit(encoded[0], SamplingParams(temperature=0, max_gen_len=40))
    doomed.cancel()
    results = [h.result(timeout=120) for h in handles]
    engine.close()
    print("RESULT " + json.dumps({
        "engine": [[r.tokens, r.logprobs] for r in results],
        "alone": [[tokens[0], logprobs[0]] for tokens, logprobs in alone],
        "cancelled": doomed.result().finish_reason,
    }))  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main(*sys.argv[1:])
